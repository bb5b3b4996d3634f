//! MQTT source (rumqttc): subscribes, decodes payloads, writes records to the
//! buffer and acknowledges a QoS 1 message to the broker only after its
//! record is durable. With a persistent session (`cleanSession: false`) the
//! broker keeps whatever the agent has not acknowledged, across agent crashes.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use edgefleet_buffer::{DeadLetter, DedupeKey, Incoming, Outcome};
use edgefleet_config::{MqttSource as MqttConfig, PayloadFormat};
use edgefleet_proto::{EncodedRecord, RecordWriter};
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use rumqttc::{
    AsyncClient, Event, MqttOptions, Packet, Publish, QoS, SubscribeFilter, SubscribeReasonCode,
    TlsConfiguration, Transport,
};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::topic::DevicePattern;
use super::{json, Source, SourceContext, SourceError};
use crate::uplink::Backoff;

pub struct MqttSource {
    config: MqttConfig,
}

impl MqttSource {
    pub fn new(config: MqttConfig) -> Self {
        Self { config }
    }
}

impl Source for MqttSource {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(run(self.config, ctx))
    }
}

/// How one subscription's messages become records.
struct Route {
    filter: String,
    device: Option<DevicePattern>,
    payload: PayloadFormat,
    content_type: String,
}

/// Appends in flight at once: enough to overlap decoding with the fsync of
/// the previous group, few enough to bound memory.
pub const MAX_APPENDS_IN_FLIGHT: usize = 4;
/// Messages taken into one append.
pub const MAX_MESSAGES_PER_APPEND: usize = 2048;
/// The processor's queue: two appends' worth.
const PROCESSOR_QUEUE: usize = 2 * MAX_MESSAGES_PER_APPEND;
/// Messages held beyond the processor's queue. At this many the source stops
/// reading from the broker until the processor catches up. The broker's
/// in-flight window is the broker's setting (it may have none), and without
/// this bound a slow disk grew the agent's memory instead of the broker's
/// queue (BENCHMARKS.md, "Memory").
const MAX_WAITING: usize = 1024;

async fn run(config: MqttConfig, ctx: SourceContext) -> Result<(), SourceError> {
    let name = config.name.clone();
    let fatal = |message: String| SourceError::Fatal {
        source_name: name.clone(),
        message,
    };
    let options = mqtt_options(&config).map_err(fatal)?;
    let (client, mut eventloop) = AsyncClient::new(options, 4096);
    // Published messages carry their real topic, so only the SUBSCRIBE
    // names the share; routing below matches the plain filters.
    let subscriptions: Vec<(String, QoS)> = config
        .subscriptions
        .iter()
        .map(|s| {
            let filter = match &config.shared_group {
                Some(group) => format!("$share/{group}/{}", s.topic),
                None => s.topic.clone(),
            };
            (filter, qos(s.qos))
        })
        .collect();
    let routes: Arc<Vec<Route>> = Arc::new(
        config
            .subscriptions
            .iter()
            .map(|s| Route {
                filter: s.topic.clone(),
                device: s.device_from_topic.as_deref().map(DevicePattern::new),
                payload: s.payload,
                content_type: s.content_type.clone(),
            })
            .collect(),
    );
    let (tx, rx) = mpsc::channel::<Publish>(PROCESSOR_QUEUE);
    let mut processor = tokio::spawn(process(
        rx,
        client.clone(),
        ctx.clone(),
        routes,
        name.clone(),
    ));
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let label = name.clone();
    // QoS 1 messages the processor has no room for yet, in arrival order.
    // The event loop keeps turning meanwhile, so keepalives and the
    // processor's PUBACKs go out. At `MAX_WAITING` it is left alone until
    // the processor catches up: the socket is not read and TCP pushes back
    // on the broker. The processor never waits for the event loop (its
    // PUBACKs wait in `Acks`), so it always drains this queue.
    let mut overflow: VecDeque<Publish> = VecDeque::new();
    let queued = ctx.metrics.source_queued(&name);
    loop {
        queued.set((overflow.len() + PROCESSOR_QUEUE - tx.capacity()) as i64);
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            permit = tx.reserve(), if !overflow.is_empty() => match permit {
                Ok(permit) => {
                    if let Some(publish) = overflow.pop_front() {
                        permit.send(publish);
                    }
                }
                Err(_) => break,
            },
            event = eventloop.poll(), if overflow.len() < MAX_WAITING => match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    tracing::info!(source = %name, host = %config.host, port = config.port, session_present = ack.session_present, "MQTT connected");
                    backoff.reset();
                    // One SUBSCRIBE for every filter, so one SUBACK says the
                    // source is receiving; `source_up` waits for it because a
                    // broker discards what is published before a subscription.
                    let filters = subscriptions
                        .iter()
                        .map(|(topic, qos)| SubscribeFilter::new(topic.clone(), *qos));
                    if let Err(e) = client.try_subscribe_many(filters) {
                        tracing::error!(source = %name, error = %e, "cannot subscribe");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let mut all_granted = true;
                    for ((topic, _), code) in subscriptions.iter().zip(&ack.return_codes) {
                        if matches!(code, SubscribeReasonCode::Failure) {
                            all_granted = false;
                            tracing::error!(source = %name, %topic, "the broker refused the subscription");
                        }
                    }
                    tracing::info!(source = %name, subscriptions = subscriptions.len(), all_granted, "MQTT subscribed");
                    ctx.metrics.source_up(&label, true);
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    if publish.qos == QoS::AtMostOnce {
                        // QoS 0 has no broker-side flow control: never let it
                        // stall the event loop (and with it keepalives).
                        if tx.try_send(publish).is_err() {
                            ctx.metrics.dropped("qos0_overflow", 1);
                        }
                    } else if overflow.is_empty() {
                        match tx.try_send(publish) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(publish)) => overflow.push_back(publish),
                            Err(mpsc::error::TrySendError::Closed(_)) => break,
                        }
                    } else {
                        overflow.push_back(publish);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    ctx.metrics.source_up(&label, false);
                    ctx.metrics.source_reconnect(&label);
                    let delay = backoff.next_delay();
                    tracing::warn!(source = %name, error = %e, retry_in_ms = delay.as_millis() as u64, "MQTT connection failed");
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            },
            _ = &mut processor => {
                return Err(fatal("the message processor stopped".into()));
            }
        }
    }
    queued.set(0);
    // Shutdown: take no more messages, let the processor make the received
    // ones durable and acknowledge them, and keep the event loop turning so
    // those acknowledgements reach the broker. Unacknowledged messages stay
    // with the broker for next time.
    drop(tx);
    let deadline = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut processor => break,
            _ = &mut deadline => break,
            event = eventloop.poll() => if event.is_err() { break },
        }
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(event) = eventloop.poll().await {
            if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    ctx.metrics.source_up(&label, false);
    Ok(())
}

fn qos(level: u8) -> QoS {
    if level == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

fn mqtt_options(config: &MqttConfig) -> Result<MqttOptions, String> {
    let mut options = MqttOptions::new(&config.client_id, &config.host, config.port);
    options
        .set_keep_alive(Duration::from_secs(config.keep_alive_secs.into()))
        .set_clean_session(config.clean_session)
        .set_manual_acks(true)
        .set_max_packet_size(1 << 20, 1 << 20);
    if let Some(user) = &config.username {
        let password = match &config.password_file {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read passwordFile {path}: {e}"))?
                .trim_end()
                .to_string(),
            None => String::new(),
        };
        options.set_credentials(user, password);
    }
    if let Some(tls) = &config.tls {
        let ca = edgefleet_pki::load::certs(std::path::Path::new(&tls.ca_file))
            .map_err(|e| e.to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in ca {
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", tls.ca_file))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
        let client_config = match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(
                    edgefleet_pki::load::certs(std::path::Path::new(cert))
                        .map_err(|e| e.to_string())?,
                    edgefleet_pki::load::private_key(std::path::Path::new(key))
                        .map_err(|e| e.to_string())?,
                )
                .map_err(|e| format!("MQTT client certificate: {e}"))?,
            _ => builder.with_no_client_auth(),
        };
        options.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(
            client_config,
        ))));
    }
    Ok(options)
}

type Pending = BoxFuture<
    'static,
    (
        Vec<u16>,
        Result<Vec<Option<Outcome>>, edgefleet_buffer::BufferError>,
    ),
>;

/// Decodes messages, appends them in groups and acknowledges them in order.
async fn process(
    mut rx: mpsc::Receiver<Publish>,
    client: AsyncClient,
    ctx: SourceContext,
    routes: Arc<Vec<Route>>,
    name: String,
) {
    let mut pending: FuturesOrdered<Pending> = FuturesOrdered::new();
    let mut acks = Acks::default();
    let mut open = true;
    while open || !pending.is_empty() {
        tokio::select! {
            biased;
            Some((packet_ids, result)) = pending.next(), if !pending.is_empty() => {
                acknowledge(&client, &ctx, &name, &mut acks, packet_ids, result).await;
            }
            // The client's request queue was full: try again shortly (the
            // event loop empties it whenever the source reads the broker).
            _ = tokio::time::sleep(ACK_RETRY), if !acks.is_empty() => acks.send(&client),
            first = rx.recv(), if open && pending.len() < MAX_APPENDS_IN_FLIGHT => {
                let Some(first) = first else { open = false; continue };
                let mut publishes = vec![first];
                while publishes.len() < MAX_MESSAGES_PER_APPEND {
                    match rx.try_recv() {
                        Ok(p) => publishes.push(p),
                        Err(_) => break,
                    }
                }
                pending.push_back(append(&ctx, &routes, &name, publishes));
            }
        }
    }
    // Shutdown: the source keeps the event loop turning until this returns.
    let _ = tokio::time::timeout(Duration::from_secs(5), acks.drain(&client)).await;
}

const ACK_RETRY: Duration = Duration::from_millis(10);

/// PUBACKs not yet taken by the client (packet ids of QoS 1 messages), in
/// the order MQTT requires (that of the messages). Sent without waiting: a
/// processor that waited for the client's request queue would wait for the
/// event loop, which the source leaves alone while the processor is behind.
/// rumqttc sends one request per turn of its event loop, after every packet
/// it has read, so PUBACKs lag behind a busy broker; a packet id is all
/// each one keeps, and MQTT allows at most 65,535 unacknowledged messages.
#[derive(Default)]
struct Acks(VecDeque<u16>);

impl Acks {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn push(&mut self, client: &AsyncClient, packet_ids: Vec<u16>) {
        self.0.extend(packet_ids);
        self.send(client);
    }

    fn send(&mut self, client: &AsyncClient) {
        while let Some(&pkid) = self.0.front() {
            // Fails when the queue is full, or closed (the event loop is
            // gone, and the broker will redeliver to the next connection).
            if client.try_ack(&ack_of(pkid)).is_err() {
                return;
            }
            self.0.pop_front();
        }
    }

    async fn drain(&mut self, client: &AsyncClient) {
        while let Some(pkid) = self.0.pop_front() {
            if client.ack(&ack_of(pkid)).await.is_err() {
                return;
            }
        }
    }
}

/// A message to hand rumqttc's `ack`, which reads only its QoS and packet
/// id: no topic or payload (the payload shares an allocation with the
/// client's read buffer, so holding messages until their append was durable
/// held whole read buffers).
fn ack_of(pkid: u16) -> Publish {
    let mut publish = Publish::new("", QoS::AtLeastOnce, Vec::new());
    publish.pkid = pkid;
    publish
}

fn append(ctx: &SourceContext, routes: &[Route], name: &str, publishes: Vec<Publish>) -> Pending {
    // `None` marks a message that did not decode: it is dead-lettered and
    // acknowledged in its turn, and never blocks the ones behind it.
    let mut slots = Vec::with_capacity(publishes.len());
    let mut incoming = Vec::with_capacity(publishes.len());
    let mut signals = RecordWriter::new();
    for publish in &publishes {
        match to_record(routes, name, publish, &mut signals) {
            Ok(record) => {
                let dedupe = (publish.qos != QoS::AtMostOnce).then(|| DedupeKey {
                    key: [name.as_bytes(), b"/", &publish.pkid.to_be_bytes()].concat(),
                    fingerprint: fingerprint(publish),
                    redelivery: publish.dup,
                });
                incoming.push(Incoming { record, dedupe });
                slots.push(true);
            }
            Err(reason) => {
                ctx.metrics.decode_error(name);
                tracing::warn!(source = %name, topic = %publish.topic, %reason, "payload rejected; kept as a dead letter");
                ctx.buffer.dead_letter(DeadLetter {
                    source: name.to_string(),
                    origin: publish.topic.clone(),
                    reason,
                    received_at_ns: crate::now_ns(),
                    payload: String::from_utf8_lossy(
                        &publish.payload[..publish.payload.len().min(4096)],
                    )
                    .into_owned(),
                });
                slots.push(false);
            }
        }
    }
    // Only QoS 1 messages are acknowledged (subscriptions are QoS 0 or 1).
    let packet_ids: Vec<u16> = publishes
        .iter()
        .filter(|p| p.qos != QoS::AtMostOnce)
        .map(|p| p.pkid)
        .collect();
    drop(publishes);
    let buffer = ctx.buffer.clone();
    Box::pin(async move {
        let result = if incoming.is_empty() {
            Ok(Vec::new())
        } else {
            buffer.append(incoming).await
        };
        let result = result.map(|outcomes| {
            let mut outcomes = outcomes.into_iter();
            slots
                .into_iter()
                .map(|decoded| if decoded { outcomes.next() } else { None })
                .collect()
        });
        (packet_ids, result)
    })
}

async fn acknowledge(
    client: &AsyncClient,
    ctx: &SourceContext,
    name: &str,
    acks: &mut Acks,
    packet_ids: Vec<u16>,
    result: Result<Vec<Option<Outcome>>, edgefleet_buffer::BufferError>,
) {
    match result {
        Ok(outcomes) => {
            let stored = outcomes
                .iter()
                .filter(|o| matches!(o, Some(Outcome::Stored(_))))
                .count();
            ctx.metrics.records_in(name, stored as u64);
            acks.push(client, packet_ids);
        }
        Err(e) => {
            // Not acknowledged, so the broker keeps the messages; reconnect so
            // it redelivers them once the buffer can take them again.
            tracing::error!(source = %name, error = %e, messages = packet_ids.len(), "cannot buffer messages; leaving them with the broker");
            ctx.metrics.dropped("buffer_error_retried", 0);
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = client.try_disconnect();
        }
    }
}

/// The record of one message, written straight to its wire form (the
/// buffer stores it as it is).
fn to_record(
    routes: &[Route],
    name: &str,
    publish: &Publish,
    signals: &mut RecordWriter,
) -> Result<EncodedRecord, String> {
    let route = routes
        .iter()
        .find(|r| topic_matches(&r.filter, &publish.topic))
        .ok_or_else(|| format!("topic {} matches no subscription", publish.topic))?;
    let device_id = match &route.device {
        Some(pattern) => pattern
            .device(&publish.topic)
            .ok_or_else(|| "topic does not match deviceFromTopic".to_string())?,
        None => publish.topic.as_str(),
    };
    Ok(match route.payload {
        PayloadFormat::Json => {
            let timestamp_ns =
                json::decode_into(&publish.payload, signals).map_err(|e| e.to_string())?;
            signals.finish(name, device_id, timestamp_ns.unwrap_or_else(crate::now_ns))
        }
        PayloadFormat::Raw => RecordWriter::raw(
            name,
            device_id,
            crate::now_ns(),
            &publish.payload,
            &route.content_type,
        ),
    })
}

fn fingerprint(publish: &Publish) -> [u8; 16] {
    let digest = Sha256::new()
        .chain_update(publish.topic.as_bytes())
        .chain_update([0u8])
        .chain_update(&publish.payload)
        .finalize();
    digest[..16].try_into().expect("sha256 is 32 bytes")
}

/// MQTT topic filter matching (`+` one level, `#` the rest).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        match level {
            "#" => return true,
            "+" => {
                if topic_levels.next().is_none() {
                    return false;
                }
            }
            literal => {
                if topic_levels.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    topic_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::topic_matches;

    #[test]
    fn filters_match_like_a_broker() {
        assert!(topic_matches("devices/+/telemetry", "devices/a/telemetry"));
        assert!(!topic_matches(
            "devices/+/telemetry",
            "devices/a/b/telemetry"
        ));
        assert!(topic_matches("devices/#", "devices/a/b"));
        assert!(topic_matches("#", "x"));
        assert!(!topic_matches("a/b", "a"));
        assert!(!topic_matches("a", "a/b"));
    }
}
