//! `edgefleet demo`: the whole path on one machine with nothing installed.
//!
//! Simulated devices → embedded MQTT broker (rumqttd) → edge agent (durable
//! buffer) → mTLS gRPC → cloud ingest (embedded store), and next to them a
//! simulated vehicle CAN bus (a candump log made from a DBC by the simulator,
//! replayed at recorded speed and decoded with the same DBC). Halfway
//! through, the ingest is stopped for a few seconds and started again, so the
//! agent is seen buffering and then draining. At the end every device's and
//! every CAN message's records are read back from the store and compared
//! with what was published on MQTT or sent on the bus.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use cloud_ingest::query::{Query, RecordSource};
use cloud_ingest::sink::embedded::EmbeddedStore;
use cloud_ingest::{EmbeddedConfig, Ingest, IngestConfig, SinkConfig, TlsMode};
use edge_agent::{Agent, ConfigFeed};
use edgefleet_config::AgentConfig;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// How long devices publish.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Number of simulated devices.
    #[arg(long, default_value_t = 10)]
    devices: u32,
    /// Messages per second per device.
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// Print the final summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Keep the working directory (PKI, buffer, store) instead of deleting it.
    #[arg(long)]
    keep: bool,
}

const AGENT_ID: &str = "demo-gateway-01";

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if std::env::var_os("RUST_LOG").is_none() {
        // The progress line is the show; logs only when something is wrong.
        // The uplink's retry warnings during the staged outage are the
        // progress line's "ingest DOWN"; rumqttd logs its clients' goodbyes.
        std::env::set_var("RUST_LOG", "warn,rumqttd=off,edge_agent::uplink=error");
    }
    edge_agent::telemetry::init_logging(false);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(demo(args))
}

struct Published(Vec<AtomicU64>);

async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let work = tempfile::Builder::new()
        .prefix("edgefleet-demo-")
        .tempdir()?;
    let dir = work.path().to_path_buf();
    say(&args, &format!("working directory {}", dir.display()));

    let pki = edgefleet_pki::dev::init(
        &dir.join("pki"),
        &[AGENT_ID.to_string()],
        &["localhost".into(), "127.0.0.1".into()],
    )?;
    say(
        &args,
        "dev PKI: CA, ingest server certificate, agent client certificate (mTLS)",
    );

    let mqtt_port = start_broker()?;
    say(
        &args,
        &format!("embedded MQTT broker (rumqttd) on 127.0.0.1:{mqtt_port}"),
    );

    let store_dir = dir.join("store");
    let ingest_config = |listen: SocketAddr| {
        let mut c = IngestConfig::new(
            listen,
            TlsMode::Mtls {
                cert: pki.server_cert(),
                key: pki.server_key(),
                client_ca: pki.ca_cert(),
            },
            SinkConfig::Embedded(EmbeddedConfig::new(&store_dir)),
        );
        c.goaway_retry_after = Duration::from_millis(200);
        c
    };
    let mut ingest = IngestRun::start(ingest_config("127.0.0.1:0".parse()?)).await?;
    let ingest_addr = ingest.addr;
    say(
        &args,
        &format!("cloud-ingest (mTLS gRPC, embedded store) on {ingest_addr}"),
    );

    let can = CanBus::simulate(&dir, args.duration)?;
    say(
        &args,
        &format!(
            "vehicle CAN bus {CAN_IFACE}: {} frames of {} DBC messages over {:?}, replayed at recorded speed",
            can.frames.values().sum::<u64>(),
            can.frames.len(),
            args.duration
        ),
    );

    let agent_config = agent_config(&dir, &pki, mqtt_port, ingest_addr, &can)?;
    let (_config_tx, config_rx) = watch::channel(agent_config);
    let agent_stop = CancellationToken::new();
    let (ready_tx, ready_rx) = oneshot::channel();
    let agent_task = tokio::spawn(Agent::run(
        ConfigFeed::Channel(config_rx),
        agent_stop.clone(),
        Some(ready_tx),
    ));
    let agent = ready_rx.await.context("the agent did not start")?;
    say(
        &args,
        &format!(
            "edge-agent {AGENT_ID} (durable buffer in {})",
            dir.join("agent").display()
        ),
    );

    // A broker discards what is published before anyone subscribes: let the
    // agent's subscription be in place before the devices start.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.metrics.source_is_up("mqtt") {
        if Instant::now() > deadline {
            bail!("the agent did not subscribe to the embedded broker within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Devices.
    let published = Arc::new(Published(
        (0..args.devices).map(|_| AtomicU64::new(0)).collect(),
    ));
    let devices_stop = CancellationToken::new();
    let mut device_tasks = Vec::new();
    for d in 0..args.devices {
        device_tasks.push(tokio::spawn(device(
            d,
            mqtt_port,
            args.rate,
            published.clone(),
            devices_stop.clone(),
        )));
    }
    say(
        &args,
        &format!(
            "{} devices publishing {} msg/s each (QoS 1) for {:?}",
            args.devices, args.rate, args.duration
        ),
    );

    let started = Instant::now();
    let mut restarted = false;
    let mut progress = Progress::new(!args.json);
    let total = |p: &Published| p.0.iter().map(|c| c.load(Ordering::Relaxed)).sum::<u64>();
    let mut stored_before_restart = 0;
    while started.elapsed() < args.duration {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let stored = stored_before_restart + ingest.stored();
        progress.show(started, total(&published), &agent, stored, ingest.is_up());
        if !restarted && started.elapsed() >= args.duration / 2 {
            restarted = true;
            progress.note("stopping cloud-ingest for 3 s: the agent keeps buffering");
            // Read the count after the stop: a draining ingest still commits.
            stored_before_restart += ingest.stop().await?;
            let outage = Instant::now();
            while outage.elapsed() < Duration::from_secs(3) {
                tokio::time::sleep(Duration::from_millis(250)).await;
                progress.show(
                    started,
                    total(&published),
                    &agent,
                    stored_before_restart,
                    false,
                );
            }
            ingest = IngestRun::start(ingest_config(ingest_addr)).await?;
            progress.note("cloud-ingest is back: the agent drains its backlog");
        }
    }
    devices_stop.cancel();
    for task in device_tasks {
        let _ = task.await;
    }
    let mqtt_published = total(&published);
    let published_total = mqtt_published + can.frames.values().sum::<u64>();
    let drained = Instant::now();
    while stored_before_restart + ingest.stored() < published_total
        && drained.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
        progress.show(
            started,
            mqtt_published,
            &agent,
            stored_before_restart + ingest.stored(),
            true,
        );
    }
    progress.show(
        started,
        mqtt_published,
        &agent,
        stored_before_restart + ingest.stored(),
        true,
    );
    progress.finish();

    agent_stop.cancel();
    agent_task.await??;
    ingest.stop().await?;

    // Read everything back from the store and compare per device.
    let store = EmbeddedStore::open_existing(&store_dir)?;
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut can_stored: BTreeMap<String, u64> = BTreeMap::new();
    store.query(&Query::default(), &mut |_, record| {
        if record.source == CAN_IFACE {
            *can_stored.entry(record.device_id.clone()).or_default() += 1;
        } else if let Some(n) = counter(&record) {
            seen.entry(record.device_id.clone()).or_default().push(n);
        }
        true
    })?;
    let mut summary = Summary::default();
    for (d, count) in published.0.iter().enumerate() {
        let device = device_name(d as u32);
        let sent = count.load(Ordering::Relaxed);
        let mut ns = seen.remove(&device).unwrap_or_default();
        let stored = ns.len() as u64;
        ns.sort_unstable();
        ns.dedup();
        let unique = ns.len() as u64;
        let missing: Vec<u64> = (0..sent).filter(|n| ns.binary_search(n).is_err()).collect();
        summary.add(&device, sent, stored, stored - unique, &missing);
    }
    // A bus frame carries no counter: per message, the stored count must
    // equal the frames on the bus (the store's dedupe by sequence number and
    // the counts together rule out loss and duplication).
    for (message, &sent) in &can.frames {
        let stored = can_stored.remove(message).unwrap_or(0);
        summary.add_counted(&format!("{CAN_IFACE}/{message}"), sent, stored);
    }
    for (message, stored) in can_stored {
        summary.add_counted(&format!("{CAN_IFACE}/{message}"), 0, stored);
    }
    summary.elapsed = started.elapsed();
    summary.ingest_restarts = u32::from(restarted);
    summary.buffer_dropped = agent.buffer.stats().dropped_full_total;
    if args.json {
        println!("{}", serde_json::to_string(&summary.json())?);
    } else {
        summary.print();
    }
    if args.keep {
        let kept = work.keep();
        eprintln!("kept {}", kept.display());
    }
    Ok(
        if summary.lost == 0 && summary.duplicates == 0 && summary.published > 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

const CAN_IFACE: &str = "can0";
/// The vehicle bus of the demo: a few messages of the example DBC, at their
/// DBC cycle times.
const CAN_MESSAGES: &[&str] = &[
    "ECM_EngineData",
    "ECM_FuelData",
    "TCM_Status",
    "ECM_Ambient",
];
const VEHICLE_DBC: &str = include_str!("../crates/can/testdata/vehicle.dbc");

/// A simulated CAN bus written as a candump log for the agent to replay.
struct CanBus {
    log: std::path::PathBuf,
    dbc: std::path::PathBuf,
    /// Frames on the bus, by DBC message name.
    frames: BTreeMap<String, u64>,
}

impl CanBus {
    fn simulate(dir: &std::path::Path, duration: Duration) -> anyhow::Result<Self> {
        use edgefleet_can::simulate::{run, SimConfig};
        let dbc = dir.join("vehicle.dbc");
        std::fs::write(&dbc, VEHICLE_DBC)?;
        let decoder = edgefleet_can::Decoder::from_dbc_str("vehicle.dbc", VEHICLE_DBC)?;
        let config = SimConfig {
            only: CAN_MESSAGES.iter().map(|m| m.to_string()).collect(),
            start: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?,
            ..SimConfig::default()
        };
        let log = dir.join("vehicle-can0.log");
        let mut writer = edgefleet_can::candump::CandumpWriter::new(std::io::BufWriter::new(
            std::fs::File::create(&log)?,
        ));
        let mut frames: BTreeMap<String, u64> = BTreeMap::new();
        let mut sink = |at: Duration, frame: &edgefleet_can::CanFrame| -> anyhow::Result<()> {
            let message = decoder.decode(frame)?.message;
            *frames.entry(message.to_string()).or_default() += 1;
            writer.write_frame(
                edgefleet_can::candump::Timestamp::from_duration(at),
                CAN_IFACE,
                frame,
            )?;
            Ok(())
        };
        run(&decoder, &config, duration, &mut sink)?;
        writer.into_inner().flush()?;
        Ok(Self { log, dbc, frames })
    }
}

fn say(args: &DemoArgs, text: &str) {
    if !args.json {
        eprintln!("  • {text}");
    }
}

fn device_name(d: u32) -> String {
    format!("sensor-{d:03}")
}

fn counter(record: &edgefleet_proto::Record) -> Option<u64> {
    let Some(edgefleet_proto::record::Value::Signals(signals)) = &record.value else {
        return None;
    };
    signals
        .signals
        .iter()
        .find(|s| s.name == "n")
        .and_then(|s| match s.value {
            Some(edgefleet_proto::signal::Value::I64(n)) => u64::try_from(n).ok(),
            _ => None,
        })
}

fn agent_config(
    dir: &std::path::Path,
    pki: &edgefleet_pki::dev::DevPki,
    mqtt_port: u16,
    ingest: SocketAddr,
    can: &CanBus,
) -> anyhow::Result<AgentConfig> {
    let text = format!(
        r#"
agent:
  id: {AGENT_ID}
  dataDir: {data}
sources:
  mqtt:
    - name: mqtt
      host: 127.0.0.1
      port: {mqtt_port}
      clientId: {AGENT_ID}
      cleanSession: true
      subscriptions:
        - topic: plant/+/telemetry
          qos: 1
          deviceFromTopic: plant/{{device}}/telemetry
  candumpReplay:
    - file: {can_log}
      dbc: [{dbc}]
      speed: 1.0
uplink:
  endpoint: https://127.0.0.1:{port}
  serverName: localhost
  caFile: {ca}
  certFile: {cert}
  keyFile: {key}
  backoff:
    initialMs: 100
    maxMs: 1000
metrics:
  listen: 127.0.0.1:0
"#,
        data = dir.join("agent").display(),
        can_log = can.log.display(),
        dbc = can.dbc.display(),
        port = ingest.port(),
        ca = pki.ca_cert().display(),
        cert = pki.agent_cert(AGENT_ID).display(),
        key = pki.agent_key(AGENT_ID).display(),
    );
    Ok(edgefleet_config::parse_str(&text, "demo configuration")?)
}

/// rumqttd in a thread of its own, on a free loopback port.
fn start_broker() -> anyhow::Result<u16> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config_text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 1000
max_outgoing_packet_count = 1000
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 65536
max_inflight_count = 1000
dynamic_filters = true
"#
    );
    let config: rumqttd::Config = toml::from_str(&config_text).context("broker configuration")?;
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                eprintln!("embedded broker stopped: {e}");
            }
        })?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("the embedded broker did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(port)
}

/// One simulated device: JSON telemetry at `rate` msg/s with a counter `n`,
/// counted as published when the broker acknowledges it.
async fn device(d: u32, port: u16, rate: u32, published: Arc<Published>, stop: CancellationToken) {
    let name = device_name(d);
    let mut options = MqttOptions::new(format!("device-{name}"), "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(options, 256);
    let topic = format!("plant/{name}/telemetry");
    let publisher = {
        let client = client.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
            let mut tick = tokio::time::interval(period);
            let mut n: u64 = 0;
            let phase = f64::from(d);
            while !stop.is_cancelled() {
                tick.tick().await;
                let t = n as f64 * period.as_secs_f64();
                let payload = serde_json::json!({
                    "n": n,
                    "temperature_c": 60.0 + 8.0 * (t / 10.0 + phase).sin(),
                    "pressure_bar": 4.0 + 0.2 * (t / 3.0 + phase).cos(),
                    "vibration": {"rms_mm_s": 1.2 + 0.3 * (t * 2.0).sin(), "peak_mm_s": 3.4},
                    "running": n % 600 < 550,
                    "mode": if n % 300 < 200 { "auto" } else { "manual" },
                });
                if client
                    .publish(&topic, QoS::AtLeastOnce, false, payload.to_string())
                    .await
                    .is_err()
                {
                    break;
                }
                n += 1;
            }
            n
        })
    };
    loop {
        tokio::select! {
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    published.0[d as usize].fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            },
            _ = stop.cancelled() => break,
        }
    }
    // Collect acknowledgements of the last messages in flight.
    let sent = publisher.await.unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while published.0[d as usize].load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        if let Ok(Ok(Event::Incoming(Packet::PubAck(_)))) =
            tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await
        {
            published.0[d as usize].fetch_add(1, Ordering::Relaxed);
        }
    }
    // rumqttd can discard a message it has acknowledged but not yet routed
    // when its publisher disconnects at once; give the router a moment.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = client.try_disconnect();
}

/// The ingest, in-process, restartable on the same address and store.
struct IngestRun {
    addr: SocketAddr,
    metrics: Arc<cloud_ingest::metrics::Metrics>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), cloud_ingest::IngestError>>,
}

impl IngestRun {
    async fn start(config: IngestConfig) -> anyhow::Result<Self> {
        let ingest = Ingest::bind(config).await?;
        let addr = ingest.local_addrs().grpc;
        let metrics = ingest.metrics();
        let stop = CancellationToken::new();
        let task = tokio::spawn(ingest.run(stop.clone()));
        Ok(Self {
            addr,
            metrics,
            stop,
            task,
        })
    }
    fn stored(&self) -> u64 {
        self.metrics.records_stored.get()
    }
    fn is_up(&self) -> bool {
        !self.task.is_finished()
    }
    /// Stops the ingest and returns how many records it stored in all.
    async fn stop(self) -> anyhow::Result<u64> {
        self.stop.cancel();
        self.task.await??;
        Ok(self.metrics.records_stored.get())
    }
}

struct Progress {
    tty: bool,
    enabled: bool,
    last_line: Instant,
    last_stored: (Instant, u64),
    rate: f64,
}

impl Progress {
    fn new(enabled: bool) -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            enabled,
            last_line: Instant::now() - Duration::from_secs(10),
            last_stored: (Instant::now(), 0),
            rate: 0.0,
        }
    }
    fn show(
        &mut self,
        started: Instant,
        published: u64,
        agent: &edge_agent::supervisor::AgentHandle,
        stored: u64,
        ingest_up: bool,
    ) {
        if !self.enabled {
            return;
        }
        let (at, before) = self.last_stored;
        let dt = at.elapsed().as_secs_f64();
        if dt >= 1.0 {
            self.rate = (stored.saturating_sub(before)) as f64 / dt;
            self.last_stored = (Instant::now(), stored);
        }
        let stats = agent.buffer.stats();
        let line = format!(
            "[{:5.1}s] mqtt published {published:>7} | agent took in {:>7} (mqtt + can) | buffered {:>6} | acked through seq {:>7} | stored {stored:>7} | {:>6.0} rec/s | ingest {}",
            started.elapsed().as_secs_f64(),
            stats.appended_total,
            stats.records,
            stats.acked_through,
            self.rate,
            if ingest_up { "up" } else { "DOWN" },
        );
        if self.tty {
            eprint!("\r\x1b[2K{line}");
            let _ = std::io::stderr().flush();
        } else if self.last_line.elapsed() >= Duration::from_secs(1) {
            eprintln!("{line}");
            self.last_line = Instant::now();
        }
    }
    fn note(&mut self, text: &str) {
        if self.enabled {
            if self.tty {
                eprintln!();
            }
            eprintln!("  → {text}");
        }
    }
    fn finish(&self) {
        if self.enabled && self.tty {
            eprintln!();
        }
    }
}

struct DeviceTally {
    published: u64,
    stored: u64,
    duplicates: u64,
    lost: u64,
    /// The first few missing counters, to look them up in logs and stores.
    missing_sample: Vec<u64>,
}

#[derive(Default)]
struct Summary {
    published: u64,
    stored: u64,
    duplicates: u64,
    lost: u64,
    devices: BTreeMap<String, DeviceTally>,
    elapsed: Duration,
    ingest_restarts: u32,
    buffer_dropped: u64,
}

impl Summary {
    fn add(&mut self, device: &str, published: u64, stored: u64, duplicates: u64, missing: &[u64]) {
        self.published += published;
        self.stored += stored;
        self.duplicates += duplicates;
        self.lost += missing.len() as u64;
        let tally = DeviceTally {
            published,
            stored,
            duplicates,
            lost: missing.len() as u64,
            missing_sample: missing.iter().take(10).copied().collect(),
        };
        self.devices.insert(device.into(), tally);
    }
    /// A stream known only by counts: surplus counts as duplicates, shortfall as lost.
    fn add_counted(&mut self, name: &str, published: u64, stored: u64) {
        let tally = DeviceTally {
            published,
            stored,
            duplicates: stored.saturating_sub(published),
            lost: published.saturating_sub(stored),
            missing_sample: Vec::new(),
        };
        self.published += published;
        self.stored += stored;
        self.duplicates += tally.duplicates;
        self.lost += tally.lost;
        self.devices.insert(name.into(), tally);
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "published": self.published,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "lost": self.lost,
            "ingest_restarts": self.ingest_restarts,
            "buffer_dropped": self.buffer_dropped,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "devices": self.devices.iter().map(|(k, t)| (k.clone(), serde_json::json!({"published": t.published, "stored": t.stored, "duplicates": t.duplicates, "lost": t.lost, "missing_sample": t.missing_sample}))).collect::<serde_json::Map<_, _>>(),
        })
    }
    fn print(&self) {
        println!();
        println!(
            "{:<22} {:>10} {:>10} {:>11} {:>6}",
            "device or CAN message", "published", "stored", "duplicates", "lost"
        );
        for (device, t) in &self.devices {
            println!(
                "{device:<22} {:>10} {:>10} {:>11} {:>6}",
                t.published, t.stored, t.duplicates, t.lost
            );
            if !t.missing_sample.is_empty() {
                println!(
                    "{:<22} missing counters, first ones: {:?}",
                    "", t.missing_sample
                );
            }
        }
        println!(
            "{:<22} {:>10} {:>10} {:>11} {:>6}",
            "total", self.published, self.stored, self.duplicates, self.lost
        );
        println!();
        if self.lost == 0 && self.duplicates == 0 {
            println!(
                "OK: every one of {} published records was stored exactly once, across {} ingest restart(s), in {:.1} s.",
                self.published,
                self.ingest_restarts,
                self.elapsed.as_secs_f64()
            );
        } else {
            println!(
                "FAILED: {} lost, {} duplicated.",
                self.lost, self.duplicates
            );
        }
    }
}
