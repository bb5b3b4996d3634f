//! The agent's own MQTT connection against a real Mosquitto: a broker that
//! is killed and restarted, one that freezes, an idle link kept alive, TLS
//! with client certificates, and the messages in flight when an agent that
//! fingerprinted them differently stopped. Every test counts what the
//! store holds.

use std::time::Duration;

use edgefleet_buffer::{Buffer, BufferOptions, DedupeKey, DedupeScope, Incoming};
use edgefleet_proto::{record, Record, Signal as RecordSignal, Signals};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rumqttc::{Client, Event, MqttOptions, Packet, Publish, QoS};
use sha2::{Digest, Sha256};

use edgefleet_tests::{http_get, metric, wait_until, AgentOptions, BrokerTls, Fleet, Mosquitto};

const DRAIN: Duration = Duration::from_secs(120);

fn agent_metric(o: &AgentOptions, name: &str) -> f64 {
    http_get(o.metrics_port, "/metrics")
        .ok()
        .and_then(|text| metric(&text, name, "source=\"mqtt\""))
        .unwrap_or(0.0)
}

fn signal(pid: i32, signal: Signal) {
    kill(Pid::from_raw(pid), signal).unwrap();
}

fn reconnects(o: &AgentOptions) -> f64 {
    agent_metric(o, "edge_source_reconnects_total")
}

fn subscribed(o: &AgentOptions) -> bool {
    agent_metric(o, "edge_source_up") == 1.0
}

/// Publishes `devices` × `messages` and waits until the store holds
/// `already` more than that; then one second more, so that a (wrong) late
/// duplicate would be counted. Returns the store's count.
fn publish_and_settle(
    fleet: &Fleet,
    devices: u32,
    messages: u64,
    already: u64,
    agent: &edgefleet_tests::Proc,
) -> u64 {
    let published = fleet
        .publish(devices, messages, 2000, 0)
        .unwrap()
        .wait(Duration::from_secs(60))
        .unwrap();
    assert_eq!(published, u64::from(devices) * messages);
    assert!(
        wait_until(DRAIN, || fleet.stored() >= already + published),
        "stored {} of {}; agent log ends:\n{}",
        fleet.stored(),
        already + published,
        agent.log_tail(30)
    );
    std::thread::sleep(Duration::from_secs(1));
    fleet.stored()
}

#[test]
fn the_agent_subscribes_again_after_the_broker_is_killed_and_restarted() {
    let mut fleet = Fleet::new(&["gw-1"]).unwrap();
    fleet.start_ingest().unwrap();
    let agent = AgentOptions::new("gw-1");
    let mut proc = fleet.start_agent(&agent).unwrap();
    let first = publish_and_settle(&fleet, 4, 250, 0, &proc);
    assert_eq!(first, 1000);

    // The restarted broker has no session for the agent: messages reach it
    // again only if it noticed, reconnected and subscribed anew.
    fleet.mqtt.kill_and_restart().unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || reconnects(&agent) >= 1.0
            && subscribed(&agent)),
        "the agent did not subscribe again; its log ends:\n{}",
        proc.log_tail(30)
    );
    let total = publish_and_settle(&fleet, 4, 250, first, &proc);
    assert_eq!(total, 2000, "every message stored once");
    assert!(proc.is_running());
}

#[test]
fn an_idle_link_is_kept_alive_and_a_frozen_broker_is_left_for_a_new_connection() {
    let mut fleet = Fleet::new(&["gw-1"]).unwrap();
    fleet.start_ingest().unwrap();
    let mut agent = AgentOptions::new("gw-1");
    agent.keep_alive_secs = 5;
    let proc = fleet.start_agent(&agent).unwrap();

    // Mosquitto drops a client that sends nothing for 1.5 keep alives
    // (7.5 s): only the agent's PINGREQs keep this link.
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(
        reconnects(&agent),
        0.0,
        "the idle link was dropped; agent log ends:\n{}",
        proc.log_tail(30)
    );
    let first = publish_and_settle(&fleet, 2, 100, 0, &proc);
    assert_eq!(first, 200);

    // A broker that stops answering (SIGSTOP) leaves the socket open: the
    // agent must notice the missing PINGRESP, not wait on it forever.
    let broker = fleet.mqtt.proc.pid();
    signal(broker, Signal::SIGSTOP);
    let noticed = wait_until(Duration::from_secs(20), || {
        proc.log_text()
            .contains("no PINGRESP within the keep alive")
    });
    signal(broker, Signal::SIGCONT);
    assert!(
        noticed,
        "the frozen broker went unnoticed; agent log ends:\n{}",
        proc.log_tail(30)
    );
    assert!(
        wait_until(Duration::from_secs(30), || subscribed(&agent)),
        "no new connection after the broker woke; agent log ends:\n{}",
        proc.log_tail(30)
    );
    let total = publish_and_settle(&fleet, 2, 100, first, &proc);
    assert_eq!(total, 400, "every message stored once");
}

#[test]
fn a_tls_broker_is_read_with_the_agents_certificate_and_a_wrong_ca_is_named() {
    let mut fleet = Fleet::new(&["gw-1", "gw-2"]).unwrap();
    let broker_dir = fleet.dir.path().join("tls-broker");
    std::fs::create_dir(&broker_dir).unwrap();
    // The dev PKI's server certificate names localhost; its CA issued the
    // agents' client certificates, which the broker requires.
    fleet.mqtt = Mosquitto::start(
        &broker_dir,
        1000,
        Some(BrokerTls {
            cert: &fleet.pki.server_cert(),
            key: &fleet.pki.server_key(),
            client_ca: &fleet.pki.ca_cert(),
        }),
    )
    .unwrap();
    fleet.start_ingest().unwrap();
    let mut agent = AgentOptions::new("gw-1");
    agent.mqtt_tls = Some((
        fleet.pki.ca_cert(),
        fleet.pki.agent_cert("gw-1"),
        fleet.pki.agent_key("gw-1"),
    ));
    let proc = fleet.start_agent(&agent).unwrap();

    // A gateway that trusts another CA cannot verify the broker: it says
    // so, keeps retrying, and stays up.
    let other = edgefleet_pki::dev::init(
        &fleet.dir.path().join("other-pki"),
        &["gw-2".into()],
        &["localhost".into()],
    )
    .unwrap();
    let mut stranger = AgentOptions::new("gw-2");
    stranger.mqtt_tls = Some((
        other.ca_cert(),
        fleet.pki.agent_cert("gw-2"),
        fleet.pki.agent_key("gw-2"),
    ));
    let mut stranger_proc = fleet.spawn_agent(&stranger).unwrap();

    // The devices publish on the plain listener; the agent reads over TLS.
    let stored = publish_and_settle(&fleet, 3, 200, 0, &proc);
    assert_eq!(stored, 600, "every message stored once");

    assert!(
        wait_until(Duration::from_secs(30), || reconnects(&stranger) >= 2.0),
        "the stranger did not keep retrying; its log ends:\n{}",
        stranger_proc.log_tail(30)
    );
    assert!(!subscribed(&stranger));
    assert!(stranger_proc.is_running());
    let log = stranger_proc.log_text();
    assert!(
        log.contains("TLS handshake with localhost:") && log.contains("invalid peer certificate"),
        "the stranger's log does not name the TLS failure:\n{log}"
    );
}

/// The fingerprint agents wrote before they used XXH3: SHA-256 of topic, a
/// zero byte and payload, first 16 bytes.
fn sha256_fingerprint(publish: &Publish) -> [u8; 16] {
    let digest = Sha256::new()
        .chain_update(publish.topic.as_bytes())
        .chain_update([0u8])
        .chain_update(&publish.payload)
        .finalize();
    digest[..16].try_into().unwrap()
}

/// Takes the agent's persistent session as an older agent would have had
/// it: subscribed, `count` messages delivered and none acknowledged. Returns
/// the messages as the broker delivered them (packet ids included).
fn deliver_without_acknowledging(fleet: &Fleet, client_id: &str, count: usize) -> Vec<Publish> {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", fleet.mqtt.port);
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(30));
    let (client, mut connection) = Client::new(options, 2 * count);
    client
        .subscribe("devices/+/telemetry", QoS::AtLeastOnce)
        .unwrap();
    let mut delivered = Vec::new();
    for event in connection.iter() {
        match event.expect("the broker connection") {
            Event::Incoming(Packet::SubAck(_)) => {
                for n in 0..count {
                    let topic = format!("devices/d-{}/telemetry", n % 4);
                    let payload = format!("{{\"n\":{n},\"temp\":21.5}}");
                    client
                        .publish(topic, QoS::AtLeastOnce, false, payload)
                        .unwrap();
                }
            }
            Event::Incoming(Packet::Publish(publish)) => {
                delivered.push(publish);
                if delivered.len() == count {
                    break;
                }
            }
            _ => {}
        }
    }
    // Gone without a PUBACK: the broker keeps the messages for the session
    // and sends them again, flagged DUP, when the client id returns.
    drop(connection);
    delivered
}

/// An upgrade from an agent that fingerprinted messages with SHA-256,
/// killed after its buffer committed messages and before it acknowledged
/// them to the broker: the broker redelivers them to the new agent, which
/// fingerprints with XXH3, and each must still be stored once.
#[test]
fn messages_in_flight_across_a_change_of_fingerprint_are_stored_once() {
    const MESSAGES: usize = 24;
    let mut fleet = Fleet::new(&["gw-1"]).unwrap();
    fleet.start_ingest().unwrap();
    let agent = AgentOptions::new("gw-1");
    let delivered = deliver_without_acknowledging(&fleet, &agent.client_id, MESSAGES);

    // What the old agent's buffer held: the records, committed with its
    // dedupe keys (source name, packet id) and SHA-256 fingerprints.
    let records = |scope: DedupeScope| -> Vec<Incoming> {
        delivered
            .iter()
            .map(|publish| {
                let device = publish.topic.split('/').nth(1).unwrap().to_string();
                let mut incoming = Incoming::from(Record {
                    seq: 0,
                    source: "mqtt".into(),
                    device_id: device,
                    timestamp_ns: 1_700_000_000_000_000_000,
                    value: Some(record::Value::Signals(Signals {
                        signals: vec![RecordSignal::str(
                            "payload",
                            String::from_utf8_lossy(&publish.payload),
                        )],
                    })),
                });
                incoming.dedupe = Some(DedupeKey {
                    scope,
                    id: publish.pkid,
                    fingerprint: sha256_fingerprint(publish),
                    earlier_fingerprint: None,
                    redelivery: false,
                });
                incoming
            })
            .collect()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (buffer, _) =
            Buffer::open(BufferOptions::new(fleet.agent_data_dir(&agent.id))).unwrap();
        let scope = buffer.dedupe_scope("mqtt/");
        buffer.append(records(scope)).await.unwrap();
        buffer.close().await.unwrap();
    });

    let proc = fleet.start_agent(&agent).unwrap();
    let deduplicated = || {
        http_get(agent.metrics_port, "/metrics")
            .ok()
            .and_then(|text| metric(&text, "edge_redeliveries_deduplicated", ""))
            .unwrap_or(0.0)
    };
    assert!(
        wait_until(DRAIN, || fleet.stored() >= MESSAGES as u64
            && deduplicated() >= MESSAGES as f64),
        "stored {}, redeliveries recognised {}; agent log ends:\n{}",
        fleet.stored(),
        deduplicated(),
        proc.log_tail(30)
    );
    // Time for a (wrong) second copy to arrive.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(fleet.stored(), MESSAGES as u64, "each message stored once");
    assert_eq!(deduplicated(), MESSAGES as f64);
}
