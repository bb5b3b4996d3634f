//! `footprint`: the real edge-agent's memory idle and at 50,000 records/s,
//! the time from its start to the first record stored, and binary sizes.

use std::time::{Duration, Instant};

use edgefleet_tests::{bin, AgentOptions, Fleet};

use super::{mib, rate_series, Sampler};
use crate::mqtt;
use crate::report::{ScenarioResult, Series};
use crate::sys;
use crate::Ctx;

const LOAD_RATE: f64 = 50_000.0;

pub async fn run(ctx: &Ctx) -> anyhow::Result<ScenarioResult> {
    let mut result = ctx.result("footprint");
    let phase = ctx.phase();
    let mut fleet = Fleet::new(&["fp-agent"])?;
    let port = fleet.mqtt.port;
    fleet.start_ingest()?;

    // Devices already publishing (1,000 msg/s) when the agent starts.
    let trickle = tokio::spawn(mqtt::publish(
        mqtt::DEVICES_ROOT,
        port,
        1,
        10,
        Duration::from_secs(600),
        Some(1000.0),
        "trickle",
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // `EDGEFLEET_AGENT_CMD` measures another agent build (e.g. the static
    // `edge` build that ships). The binary is the command's last word
    // (after a runner such as qemu, if any).
    let agent = edgefleet_tests::agent_command();
    let agent_bin =
        std::path::PathBuf::from(agent.get_args().last().unwrap_or(agent.get_program()));
    // The agent's code is file pages, counted in its RSS as far as they are
    // mapped, and the kernel maps whole cached folios around each fault: a
    // binary just written by the linker (large folios) measured 1.3 MiB
    // more than the same file read from disk. Start from disk, as a
    // gateway does after boot, so the figure does not depend on that.
    if let Err(e) = sys::drop_from_page_cache(&agent_bin) {
        result.note(format!(
            "Could not drop `{}` from the page cache ({e}); its idle RSS may count more of the binary.",
            agent_bin.display()
        ));
    }
    let options = AgentOptions::new("fp-agent");
    let started = Instant::now();
    let mut agent = fleet.start_agent(&options)?;
    let mut first = None;
    while started.elapsed() < Duration::from_secs(60) {
        if fleet.stored() > 0 {
            first = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    trickle.abort();
    let pid = agent.pid();

    // Idle: nothing arriving.
    tokio::time::sleep(if ctx.quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    })
    .await;
    let idle = sys::rss(pid);

    // 50,000 records/s.
    let origin = Instant::now();
    let rss = Sampler::start(origin, Duration::from_millis(100), move || {
        mib(sys::rss(pid))
    });
    let metrics_port = fleet.ingest_metrics_port;
    let stored = Sampler::start(origin, Duration::from_millis(250), move || {
        super::stored(metrics_port) as f64
    });
    let before = fleet.stored();
    let published = mqtt::publish(
        mqtt::DEVICES_ROOT,
        port,
        2,
        100,
        phase,
        Some(LOAD_RATE),
        "load",
    )
    .await?;
    let stored_during = fleet.stored() - before;
    let rss = rss.stop();
    let stored = stored.stop();
    let loaded = rss.iter().map(|(_, v)| *v).fold(0.0, f64::max);
    let peak = sys::peak_rss(pid);
    agent.terminate(Duration::from_secs(30))?;

    result.target(
        "agent idle RSS",
        mib(idle),
        "MiB",
        "< 8 MiB",
        idle < 8 << 20,
    );
    result.target(
        "agent RSS at 50k rec/s (highest sample)",
        loaded,
        "MiB",
        "< 32 MiB",
        loaded < 32.0,
    );
    result.figure("agent peak RSS (VmHWM, whole run)", mib(peak), "MiB");
    result.figure(
        "offered rate during the load phase",
        published.messages as f64 / published.seconds,
        "msg/s",
    );
    result.figure(
        "stored rate during the load phase",
        stored_during as f64 / published.seconds,
        "rec/s",
    );
    match first {
        Some(d) => result.figure(
            "agent start → first record stored",
            d.as_secs_f64() * 1000.0,
            "ms",
        ),
        None => result.note("no record was stored within 60 s of the agent's start"),
    }
    if agent_bin != bin("edge-agent") {
        result.note(format!(
            "Agent measured: `{}` ({}).",
            agent_bin.display(),
            edgefleet_tests::AGENT_CMD_ENV
        ));
    }
    for name in ["edge-agent", "cloud-ingest"] {
        let path = if name == "edge-agent" {
            agent_bin.clone()
        } else {
            bin(name)
        };
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        result.figure(
            &format!("{name} binary size ({})", profile_of(&path)),
            mib(size),
            "MiB",
        );
    }
    result.note("Binary sizes are of the binaries this run measured (x86_64; the `release` profile carries line tables); the static aarch64 build is measured in the binary-size section.");
    result.note("The agent's binary is dropped from the page cache before it starts, as after a gateway's boot: its code is then read from disk, and what the kernel maps of it no longer depends on how the file got into the cache.");
    result.note("Start → first record: devices are already publishing 1,000 msg/s when the agent process is spawned; the ingest is up.");
    result
        .throughput
        .push(rate_series("stored rec/s", "rec/s", &stored));
    result.latency.push(Series {
        name: "agent RSS".into(),
        unit: "MiB".into(),
        points: rss,
    });
    Ok(result)
}

fn profile_of(path: &std::path::Path) -> String {
    path.parent()
        .and_then(|p| p.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}
