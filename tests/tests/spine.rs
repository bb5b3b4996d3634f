//! The telemetry spine, end to end, across real processes: simulated devices
//! → Mosquitto → edge-agent → mTLS gRPC → cloud-ingest → embedded store.
//! Every test counts records: nothing lost, nothing duplicated.

use std::time::{Duration, Instant};

use edgefleet_tests::{
    check_delivery, http_get, metric, wait_until, AgentOptions, Fleet, SmallDisk,
};
use rand::Rng;

const DRAIN: Duration = Duration::from_secs(120);

fn agent_metric(o: &AgentOptions, name: &str, labels: &str) -> f64 {
    http_get(o.metrics_port, "/metrics")
        .ok()
        .and_then(|text| metric(&text, name, labels))
        .unwrap_or(0.0)
}

/// Waits until the store holds `published` records, then one second more so
/// that any (wrong) late duplicate arrives before the records are counted.
fn wait_all_stored(fleet: &Fleet, published: u64) {
    assert!(
        wait_until(DRAIN, || fleet.stored() >= published),
        "stored {} of {published}",
        fleet.stored()
    );
    std::thread::sleep(Duration::from_secs(1));
}

/// Waits for `proc` to report that its disk is full, then checks that it
/// is still running a moment later.
fn outlives_a_full_disk(proc: &mut edgefleet_tests::Proc) {
    assert!(
        wait_until(Duration::from_secs(60), || proc
            .log_text()
            .contains("No space left on device")),
        "it never reported the full disk; its log ends:\n{}",
        proc.log_tail(40)
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        proc.is_running(),
        "it died of a full disk; its log ends:\n{}",
        proc.log_tail(40)
    );
}

/// Waits until the store holds `published` records after space returned,
/// with the log of the process whose disk was full if it never does.
fn all_stored_after_space_returned(fleet: &Fleet, published: u64, full: &edgefleet_tests::Proc) {
    assert!(
        wait_until(DRAIN, || fleet.stored() >= published),
        "stored {} of {published} after space returned; the log ends:\n{}",
        fleet.stored(),
        full.log_tail(40)
    );
    std::thread::sleep(Duration::from_secs(1));
}

/// Stops the ingest gracefully and reads back everything it stored.
fn final_delivery(
    fleet: &mut Fleet,
    devices: u32,
    messages: u64,
    skip: impl Fn(u64) -> bool,
) -> edgefleet_tests::Delivery {
    let code = fleet
        .ingest
        .as_mut()
        .unwrap()
        .terminate(Duration::from_secs(30))
        .unwrap();
    assert_eq!(code, Some(0), "ingest exits cleanly on SIGTERM");
    let out = fleet.query_store().unwrap();
    check_delivery(&out, devices, messages, skip).unwrap()
}

#[test]
fn a_steady_stream_is_stored_exactly_once_in_order() {
    let mut fleet = Fleet::new(&["gw-1"]).unwrap();
    fleet.start_ingest().unwrap();
    let agent = AgentOptions::new("gw-1");
    let mut proc = fleet.start_agent(&agent).unwrap();
    let (devices, messages) = (5, 400);
    let published = fleet
        .publish(devices, messages, 2000, 0)
        .unwrap()
        .wait(Duration::from_secs(120))
        .unwrap();
    assert_eq!(published, u64::from(devices) * messages);
    assert!(
        wait_until(DRAIN, || fleet.stored() >= published),
        "stored {} of {published}; agent log:\n{}",
        fleet.stored(),
        proc.log_text()
    );
    assert_eq!(
        agent_metric(&agent, "edge_records_in_total", "source=\"mqtt\""),
        published as f64
    );
    assert!(agent_metric(&agent, "edge_buffer_commit_seconds_count", "") >= 1.0);
    // Graceful agent stop: exit 0, goodbye, buffer flushed.
    assert_eq!(proc.terminate(Duration::from_secs(30)).unwrap(), Some(0));
    let d = final_delivery(&mut fleet, devices, messages, |_| false);
    assert_eq!(
        (d.stored, d.duplicates, d.lost, d.out_of_order),
        (published, 0, 0, 0),
        "{d:?}"
    );
}

#[test]
fn sigkill_of_the_agent_under_load_loses_and_duplicates_nothing() {
    let mut fleet = Fleet::new(&["gw-1"]).unwrap();
    fleet.start_ingest().unwrap();
    // Every other test runs the agent on its default single runtime
    // thread; this one holds a runtime of several to the same guarantees.
    let agent = AgentOptions {
        worker_threads: Some(3),
        ..AgentOptions::new("gw-1")
    };
    let mut proc = fleet.start_agent(&agent).unwrap();
    let (devices, messages) = (4, 1500);
    let mut publisher = fleet.publish(devices, messages, 1500, 0).unwrap();
    let mut rng = rand::rng();
    // Three kills at least, even when the devices finish first (a slow
    // agent, under qemu say, is then still forwarding their backlog), and
    // at least one while they publish.
    let (mut kills, mut kills_while_publishing) = (0, 0);
    while (publisher.is_running() || kills < 3) && kills < 5 {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1200)));
        kills_while_publishing += u32::from(publisher.is_running());
        proc.kill9();
        kills += 1;
        std::thread::sleep(Duration::from_millis(rng.random_range(0..500)));
        proc = fleet.start_agent(&agent).unwrap();
    }
    assert!(
        kills_while_publishing >= 1,
        "the devices finished before the first kill"
    );
    let published = publisher.wait(Duration::from_secs(120)).unwrap();
    wait_all_stored(&fleet, published);
    drop(proc);
    let d = final_delivery(&mut fleet, devices, messages, |_| false);
    assert_eq!(
        (d.stored, d.duplicates, d.lost, d.out_of_order),
        (published, 0, 0, 0),
        "{kills} kills: {d:?}"
    );
}

/// Under load the buffer's compressed segments go to the ingest as they
/// are stored (`form="stored_frame"`, no compression on the way), and the
/// ingest keeps them as they came. SIGKILL of the agent while it sends
/// them, at random points, loses and duplicates nothing.
#[test]
fn sigkill_while_sending_stored_frames_loses_and_duplicates_nothing() {
    let mut fleet = Fleet::new(&["gw-1"]).unwrap();
    let agent = AgentOptions::new("gw-1");
    // Subscribed, then gone: the broker keeps what is published for the
    // agent's session, and the next agent takes it in as a flood, in
    // appends of up to 2,048 messages, which fill whole segments.
    let mut proc = fleet.start_agent(&agent).unwrap();
    proc.kill9();
    // Records of about 700 bytes, most of them random: a debug build's
    // groups in a flood are small, and a few such records fill a frame;
    // they compress too little for one value per group, so the buffer
    // stores them in pieces, and those pieces are what goes.
    let (devices, messages) = (4, 3_000);
    let published = fleet
        .publish_with_noise(devices, messages, 0, 0, 600)
        .unwrap()
        .wait(Duration::from_secs(120))
        .unwrap();
    proc = fleet.start_agent(&agent).unwrap();
    assert!(
        wait_until(DRAIN, || agent_metric(
            &agent,
            "edge_records_in_total",
            "source=\"mqtt\""
        ) >= published as f64),
        "the flood did not reach the buffer; agent log:\n{}",
        proc.log_text()
    );
    fleet.start_ingest().unwrap();
    let mut rng = rand::rng();
    let stored_frames = |agent: &AgentOptions| {
        agent_metric(
            agent,
            "edge_uplink_records_sent_total",
            "form=\"stored_frame\"",
        )
    };
    let (mut sent_as_stored, mut kills_while_draining) = (0.0f64, 0);
    for kill in 0..3 {
        let pause = if kill == 0 {
            // The first kill soon after the drain has begun.
            let began = Instant::now();
            while fleet.stored() == 0 && began.elapsed() < DRAIN {
                std::thread::sleep(Duration::from_millis(5));
            }
            rng.random_range(0..30)
        } else {
            rng.random_range(20..200)
        };
        std::thread::sleep(Duration::from_millis(pause));
        sent_as_stored = sent_as_stored.max(stored_frames(&agent));
        kills_while_draining += u32::from(fleet.stored() < published);
        proc.kill9();
        std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
        proc = fleet.start_agent(&agent).unwrap();
    }
    assert!(
        kills_while_draining >= 1,
        "the backlog was stored before the first kill"
    );
    wait_all_stored(&fleet, published);
    sent_as_stored = sent_as_stored.max(stored_frames(&agent));
    assert!(
        sent_as_stored > 0.0,
        "no record went as a stored frame; agent metrics:\n{}",
        http_get(agent.metrics_port, "/metrics").unwrap_or_default()
    );
    drop(proc);
    let d = final_delivery(&mut fleet, devices, messages, |_| false);
    assert_eq!(
        (d.stored, d.duplicates, d.lost, d.out_of_order),
        (published, 0, 0, 0),
        "{d:?}"
    );
}

#[test]
fn gateways_of_one_site_share_its_certificate_and_its_subscriptions() {
    // Two gateways of site plant-7, as a DaemonSet runs them: one site
    // certificate, one MQTT shared group, node names from the downward API.
    let mut fleet = Fleet::new(&[]).unwrap();
    edgefleet_pki::dev::issue_site(&fleet.pki, "plant-7", edgefleet_pki::dev::Validity::days(1))
        .unwrap();
    fleet.start_ingest().unwrap();
    let gateway = |node: &str| AgentOptions {
        cert: Some((
            fleet.pki.site_cert("plant-7"),
            fleet.pki.site_key("plant-7"),
        )),
        node: Some(node.into()),
        shared_group: Some("edgefleet-plant-7".into()),
        ..AgentOptions::new(node)
    };
    let (a, b) = (gateway("gw-a"), gateway("gw-b"));
    let mut proc_a = fleet.start_agent(&a).unwrap();
    let mut proc_b = fleet.start_agent(&b).unwrap();
    let (devices, messages) = (4, 1000);
    let mut publisher = fleet.publish(devices, messages, 2000, 0).unwrap();
    // One gateway dies mid-stream and comes back: its share of the messages
    // waits in its broker session and its buffer.
    std::thread::sleep(Duration::from_millis(rand::rng().random_range(300..1200)));
    assert!(publisher.is_running(), "publishing ended before the kill");
    proc_a.kill9();
    proc_a = fleet.start_agent(&a).unwrap();
    let published = publisher.wait(Duration::from_secs(120)).unwrap();
    wait_all_stored(&fleet, published);
    let per_stream = http_get(fleet.ingest_metrics_port, "/stats").unwrap();
    let stats: serde_json::Value = serde_json::from_str(&per_stream).unwrap();
    let stored_by = |stream: &str| stats["agents"][stream]["records"].as_u64().unwrap_or(0);
    let (by_a, by_b) = (stored_by("gw-a@plant-7"), stored_by("gw-b@plant-7"));
    assert_eq!(by_a + by_b, published, "{per_stream}");
    assert!(
        by_a > 0 && by_b > 0,
        "both gateways take a share: {per_stream}"
    );
    assert_eq!(proc_b.terminate(Duration::from_secs(30)).unwrap(), Some(0));
    assert_eq!(proc_a.terminate(Duration::from_secs(30)).unwrap(), Some(0));
    let d = final_delivery(&mut fleet, devices, messages, |_| false);
    // Each device's messages are split between two streams, so the store's
    // order (by stream, then sequence) interleaves them: order is not checked.
    assert_eq!((d.stored, d.duplicates, d.lost), (published, 0, 0), "{d:?}");
}

#[test]
fn sigkill_of_the_ingest_under_load_loses_and_duplicates_nothing() {
    let mut fleet = Fleet::new(&["gw-1"]).unwrap();
    fleet.start_ingest().unwrap();
    let agent = AgentOptions::new("gw-1");
    let _proc = fleet.start_agent(&agent).unwrap();
    let (devices, messages) = (4, 1500);
    let mut publisher = fleet.publish(devices, messages, 1500, 0).unwrap();
    let mut rng = rand::rng();
    // Two kills at least, even when the devices finish first (the agent is
    // then still forwarding their backlog), and one while they publish.
    let (mut kills, mut kills_while_publishing) = (0, 0);
    while (publisher.is_running() || kills < 2) && kills < 4 {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1200)));
        kills_while_publishing += u32::from(publisher.is_running());
        fleet.ingest.as_mut().unwrap().kill9();
        kills += 1;
        std::thread::sleep(Duration::from_millis(rng.random_range(0..700)));
        fleet.start_ingest().unwrap();
    }
    assert!(
        kills_while_publishing >= 1,
        "the devices finished before the first kill"
    );
    let published = publisher.wait(Duration::from_secs(120)).unwrap();
    assert!(wait_until(DRAIN, || fleet.stored() >= published));
    std::thread::sleep(Duration::from_secs(1));
    let d = final_delivery(&mut fleet, devices, messages, |_| false);
    assert_eq!(
        (d.stored, d.duplicates, d.lost, d.out_of_order),
        (published, 0, 0, 0),
        "{kills} kills: {d:?}"
    );
}

#[test]
fn the_ingest_store_running_out_of_disk_loses_and_duplicates_nothing_once_space_returns() {
    let mut fleet = Fleet::new(&["gw-1"]).unwrap();
    let disk = SmallDisk::mount(&fleet.store, 64 << 20).unwrap();
    fleet.start_ingest().unwrap();
    disk.fill(512 << 10).unwrap();
    let agent = AgentOptions::new("gw-1");
    let _proc = fleet.start_agent(&agent).unwrap();
    // 200 random characters a message: the store's compression cannot
    // make the records fit in what is left.
    let (devices, messages) = (4, 1500);
    let publisher = fleet
        .publish_with_noise(devices, messages, 3000, 0, 200)
        .unwrap();
    outlives_a_full_disk(fleet.ingest.as_mut().unwrap());
    let stored_while_full = fleet.stored();
    assert!(stored_while_full < u64::from(devices) * messages);
    disk.free().unwrap();
    let published = publisher.wait(Duration::from_secs(120)).unwrap();
    all_stored_after_space_returned(&fleet, published, fleet.ingest.as_ref().unwrap());
    let d = final_delivery(&mut fleet, devices, messages, |_| false);
    assert_eq!(
        (d.stored, d.duplicates, d.lost, d.out_of_order),
        (published, 0, 0, 0),
        "{stored_while_full} stored while the disk was full: {d:?}"
    );
}

#[test]
fn the_agent_buffer_running_out_of_disk_leaves_messages_with_the_broker_and_loses_nothing() {
    let mut fleet = Fleet::new(&["gw-1"]).unwrap();
    // The buffer's own cap (256 MiB) is far above what the disk has: it is
    // the file system that runs out.
    let agent = AgentOptions::new("gw-1");
    let disk = SmallDisk::mount(&fleet.agent_data_dir("gw-1"), 64 << 20).unwrap();
    let mut proc = fleet.start_agent(&agent).unwrap();
    disk.fill(1 << 20).unwrap();
    // No ingest yet: everything stays in the buffer until the disk is full.
    let (devices, messages) = (4, 1500);
    let publisher = fleet
        .publish_with_noise(devices, messages, 3000, 0, 200)
        .unwrap();
    outlives_a_full_disk(&mut proc);
    disk.free().unwrap();
    fleet.start_ingest().unwrap();
    let published = publisher.wait(Duration::from_secs(120)).unwrap();
    all_stored_after_space_returned(&fleet, published, &proc);
    let d = final_delivery(&mut fleet, devices, messages, |_| false);
    // Order is not asserted: the source has several appends in flight, and
    // when one fails, one behind it may already be stored while the failed
    // one's messages come back from the broker (QoS 1 redelivery).
    assert_eq!((d.stored, d.duplicates, d.lost), (published, 0, 0), "{d:?}");
}

#[test]
fn with_the_ingest_down_the_agent_buffers_then_drains_and_counts_drops_exactly() {
    let mut fleet = Fleet::new(&["gw-1"]).unwrap();
    fleet.start_ingest().unwrap();
    let mut agent = AgentOptions::new("gw-1");
    agent.max_bytes = "1MiB".into();
    agent.when_full = "dropOldest";
    let _proc = fleet.start_agent(&agent).unwrap();
    // A first wave goes straight through.
    let first = fleet
        .publish(2, 200, 2000, 0)
        .unwrap()
        .wait(Duration::from_secs(60))
        .unwrap();
    assert!(wait_until(DRAIN, || fleet.stored() >= first));
    // Ingest down (gracefully, so nothing is stored without being acked).
    fleet
        .ingest
        .as_mut()
        .unwrap()
        .terminate(Duration::from_secs(30))
        .unwrap();
    // Far more than 1 MiB of records while the ingest is away, even
    // compressed (the buffer stores segments compressed).
    let second = fleet
        .publish_with_noise(2, 6000, 0, 0, 200)
        .unwrap()
        .wait(Duration::from_secs(120))
        .unwrap();
    assert!(wait_until(Duration::from_secs(30), || {
        agent_metric(&agent, "edge_records_in_total", "source=\"mqtt\"") >= (first + second) as f64
    }));
    let status: serde_json::Value =
        serde_json::from_str(&http_get(agent.metrics_port, "/status").unwrap()).unwrap();
    let buffered = status["buffer"]["bytes"].as_u64().unwrap();
    assert!(
        buffered <= 1 << 20,
        "buffer holds {buffered} bytes, over its 1 MiB cap"
    );
    assert!(wait_until(Duration::from_secs(5), || agent_metric(
        &agent,
        "edge_dropped_records_total",
        "reason=\"buffer_full\""
    ) > 0.0));
    // Back up: the backlog drains.
    fleet.start_ingest().unwrap();
    let dropped = || {
        agent_metric(
            &agent,
            "edge_dropped_records_total",
            "reason=\"buffer_full\"",
        ) as u64
    };
    let total = first + second;
    assert!(
        wait_until(DRAIN, || fleet.stored() + dropped() >= total),
        "stored {} + dropped {} < {total}",
        fleet.stored(),
        dropped()
    );
    let dropped = dropped();
    // The backlog left in batches large enough for the agent to compress.
    let ingest_metrics = http_get(fleet.ingest_metrics_port, "/metrics").unwrap();
    assert!(
        metric(&ingest_metrics, "ingest_batches_compressed_total", "").unwrap_or(0.0) > 0.0,
        "no batch arrived compressed:\n{ingest_metrics}"
    );
    let out = {
        fleet
            .ingest
            .as_mut()
            .unwrap()
            .terminate(Duration::from_secs(30))
            .unwrap();
        fleet.query_store().unwrap()
    };
    let stored = out.lines().filter(|l| !l.trim().is_empty()).count() as u64;
    assert_eq!(
        stored + dropped,
        total,
        "stored {stored} + dropped {dropped} must equal published {total}"
    );
    assert!(
        dropped > 1000,
        "the cap must have forced drops, got {dropped}"
    );
    // What was dropped is the oldest part of the outage, never a duplicate.
    let mut seen = std::collections::HashSet::new();
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(
            seen.insert((
                v["device"].as_str().unwrap().to_string(),
                v["signals"]["n"].as_u64().unwrap()
            )),
            "duplicate {line}"
        );
    }
}

#[test]
fn a_stalled_buffer_bounds_what_the_agent_holds_and_the_broker_keeps_the_rest() {
    // A broker with no in-flight window sends everything at once; the agent
    // must hold at most its source queue (`PROCESSOR_QUEUE + MAX_WAITING` in
    // edge-agent/src/sources/mqtt.rs) and leave the rest with the broker.
    const QUEUE_BOUND: f64 = (4096 + 1024) as f64;
    let mut fleet = Fleet::with_broker_window(&["gw-1"], 0).unwrap();
    let mut agent = AgentOptions::new("gw-1");
    // The ingest is down and the buffer small and blocking: appends stall
    // once it is full.
    agent.max_bytes = "1MiB".into();
    agent.when_full = "block";
    let proc = fleet.start_agent(&agent).unwrap();
    let (devices, messages) = (4, 10_000);
    // Payloads compression cannot shrink, so the buffer fills at about
    // what the cap says rather than at zstd's ratio.
    let published = fleet
        .publish_with_noise(devices, messages, 0, 0, 200)
        .unwrap()
        .wait(Duration::from_secs(120))
        .unwrap();
    assert_eq!(published, u64::from(devices) * messages);
    let queued = || agent_metric(&agent, "edge_source_queued_messages", "source=\"mqtt\"");
    let buffered = || agent_metric(&agent, "edge_records_in_total", "source=\"mqtt\"");
    // Stalled: the buffer took what fits and the queue is full.
    assert!(
        wait_until(Duration::from_secs(60), || queued() >= QUEUE_BOUND),
        "queued {} of {QUEUE_BOUND}; agent log:\n{}",
        queued(),
        proc.log_text()
    );
    for _ in 0..10 {
        let held = queued();
        assert!(held <= QUEUE_BOUND, "the agent queued {held} messages");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Buffered + queued + at most 4 appends of 2,048 in flight: the rest is
    // still with the broker.
    let in_agent = buffered() + queued() + (4 * 2048) as f64;
    assert!(
        in_agent < published as f64,
        "the agent holds {in_agent} of {published}: nothing was left with the broker"
    );
    // The ingest comes up: everything arrives, once.
    fleet.start_ingest().unwrap();
    wait_all_stored(&fleet, published);
    assert_eq!(queued(), 0.0);
    let d = final_delivery(&mut fleet, devices, messages, |_| false);
    assert_eq!((d.stored, d.duplicates, d.lost), (published, 0, 0), "{d:?}");
}

#[test]
fn malformed_payloads_are_dead_lettered_and_the_rest_flows() {
    let mut fleet = Fleet::new(&["gw-1"]).unwrap();
    fleet.start_ingest().unwrap();
    let agent = AgentOptions::new("gw-1");
    let mut proc = fleet.start_agent(&agent).unwrap();
    let (devices, messages, bad_every) = (3, 300, 10);
    let published = fleet
        .publish(devices, messages, 2000, bad_every)
        .unwrap()
        .wait(Duration::from_secs(60))
        .unwrap();
    let bad = u64::from(devices) * (messages / bad_every);
    assert!(wait_until(DRAIN, || fleet.stored() >= published - bad));
    assert_eq!(
        agent_metric(&agent, "edge_decode_errors_total", "source=\"mqtt\""),
        bad as f64
    );
    assert!(
        proc.log_text().contains("payload rejected"),
        "the agent logs each rejected payload"
    );
    assert!(
        proc.log_text().contains("devices/dev-000/telemetry"),
        "with its topic"
    );
    proc.terminate(Duration::from_secs(30)).unwrap();
    let letters = edgefleet_tests::agent_command()
        .args(["dead-letters", "--data-dir"])
        .arg(fleet.agent_data_dir("gw-1"))
        .output()
        .unwrap();
    let letters = String::from_utf8(letters.stdout).unwrap();
    assert_eq!(letters.lines().count() as u64, bad, "{letters}");
    assert!(letters.contains("invalid JSON at line 1"));
    let d = final_delivery(&mut fleet, devices, messages, |n| {
        n % bad_every == bad_every - 1
    });
    assert_eq!((d.duplicates, d.lost), (0, 0), "{d:?}");
}

#[test]
fn agents_with_untrusted_or_expired_certificates_are_refused_and_others_unaffected() {
    let mut fleet = Fleet::new(&["gw-good"]).unwrap();
    fleet.start_ingest().unwrap();
    // A certificate from another CA, and an expired one from the right CA.
    let rogue = edgefleet_pki::dev::init(
        &fleet.dir.path().join("rogue"),
        &["gw-rogue".into()],
        &["localhost".into()],
    )
    .unwrap();
    edgefleet_pki::dev::issue_agent(
        &fleet.pki,
        "gw-old",
        edgefleet_pki::dev::Validity::expired(),
    )
    .unwrap();
    let mut rogue_opts = AgentOptions::new("gw-rogue");
    rogue_opts.cert = Some((rogue.agent_cert("gw-rogue"), rogue.agent_key("gw-rogue")));
    let mut old_opts = AgentOptions::new("gw-old");
    old_opts.cert = Some((
        fleet.pki.agent_cert("gw-old"),
        fleet.pki.agent_key("gw-old"),
    ));
    let good = AgentOptions::new("gw-good");
    let rogue_proc = fleet.start_agent(&rogue_opts).unwrap();
    let old_proc = fleet.start_agent(&old_opts).unwrap();
    let _good_proc = fleet.start_agent(&good).unwrap();
    // Each agent has its own MQTT session and so gets every message.
    let published = fleet
        .publish(2, 100, 1000, 0)
        .unwrap()
        .wait(Duration::from_secs(60))
        .unwrap();
    assert!(wait_until(DRAIN, || fleet.stored() >= published));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        fleet.stored(),
        published,
        "only the good agent's records are stored"
    );
    // The refused agents keep their data buffered and say why they are refused.
    assert!(wait_until(Duration::from_secs(10), || rogue_proc
        .log_text()
        .contains("uplink session ended")));
    assert!(wait_until(Duration::from_secs(10), || old_proc
        .log_text()
        .contains("uplink session ended")));
    assert_eq!(
        agent_metric(&rogue_opts, "edge_buffer_records", ""),
        published as f64
    );
    let ingest_metrics = http_get(fleet.ingest_metrics_port, "/metrics").unwrap();
    let rejects = |reason: &str| {
        metric(
            &ingest_metrics,
            "ingest_rejects_total",
            &format!("reason=\"{reason}\""),
        )
        .unwrap_or(0.0)
    };
    assert!(
        rejects("unknown_ca") >= 1.0,
        "ingest counts the foreign CA:\n{ingest_metrics}"
    );
    assert!(
        rejects("expired_certificate") >= 1.0,
        "ingest counts the expired certificate:\n{ingest_metrics}"
    );
    let log = fleet.ingest_log().to_lowercase();
    assert!(
        log.contains("expired"),
        "ingest names the expired certificate:\n{log}"
    );
}

#[test]
fn a_corrupt_buffer_is_quarantined_and_the_agent_carries_on() {
    let mut fleet = Fleet::new(&["gw-1"]).unwrap();
    fleet.start_ingest().unwrap();
    let agent = AgentOptions::new("gw-1");
    let mut proc = fleet.start_agent(&agent).unwrap();
    let first = fleet
        .publish(1, 50, 500, 0)
        .unwrap()
        .wait(Duration::from_secs(60))
        .unwrap();
    assert!(wait_until(DRAIN, || fleet.stored() >= first));
    proc.terminate(Duration::from_secs(30)).unwrap();
    // Damage every file of the buffer.
    let buffer = fleet.agent_data_dir("gw-1").join("buffer");
    let mut files = vec![buffer.clone()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            let len = std::fs::metadata(&path).unwrap().len().max(256) as usize;
            std::fs::write(&path, vec![0x5Au8; len]).unwrap();
        }
    }
    let proc = fleet.start_agent(&agent).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || proc
            .log_text()
            .contains("BUFFER CORRUPT")),
        "{}",
        proc.log_text()
    );
    // The metrics endpoint may come up a moment after the log line.
    assert!(
        wait_until(Duration::from_secs(10), || agent_metric(
            &agent,
            "edge_buffer_quarantined_total",
            ""
        ) == 1.0),
        "edge_buffer_quarantined_total is {}, not 1",
        agent_metric(&agent, "edge_buffer_quarantined_total", "")
    );
    assert!(
        fleet
            .agent_data_dir("gw-1")
            .join("quarantine")
            .read_dir()
            .unwrap()
            .count()
            == 1
    );
    // The fresh buffer anchors past what the ingest stored and new data flows.
    let second = fleet
        .publish(1, 50, 500, 0)
        .unwrap()
        .wait(Duration::from_secs(60))
        .unwrap();
    assert!(
        wait_until(DRAIN, || fleet.stored() >= first + second),
        "stored {}",
        fleet.stored()
    );
    let out = {
        fleet
            .ingest
            .as_mut()
            .unwrap()
            .terminate(Duration::from_secs(30))
            .unwrap();
        fleet.query_store().unwrap()
    };
    assert_eq!(
        out.lines().count() as u64,
        first + second,
        "new records are not taken for duplicates"
    );
}
