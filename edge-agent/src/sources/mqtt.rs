//! MQTT source (rumqttc's packet codec, our own connection in
//! `mqtt_session`): subscribes, decodes payloads, writes records to the
//! buffer and acknowledges a QoS 1 message to the broker only after its
//! record is durable. With a persistent session (`cleanSession: false`) the
//! broker keeps whatever the agent has not acknowledged, across agent crashes.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use edgefleet_buffer::{AppendBatch, DeadLetter, DedupeKey, DedupeScope, Outcome};
use edgefleet_config::{MqttSource as MqttConfig, PayloadFormat};
use edgefleet_proto::RecordWriter;
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use rumqttc::{
    Login, Packet, Publish, QoS, SubAck, Subscribe, SubscribeFilter, SubscribeReasonCode,
};
use tokio::sync::mpsc;

use super::mqtt_session::{self, Connection, SessionError, Settings};
use super::topic::DevicePattern;
use super::{fingerprint, json, Source, SourceContext, SourceError};
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

/// A QoS 1 message's packet id, with the connection it came on: a PUBACK
/// is only ever sent on that connection. On a later one the broker may
/// have given the id to another message, which a stale PUBACK would
/// acknowledge before it is durable; with a persistent session the broker
/// redelivers the message instead, and the buffer's dedupe memory knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct AckId {
    connection: u32,
    pkid: u16,
}

/// A message read from the broker, with the connection it came on.
struct Delivery {
    connection: u32,
    publish: Publish,
}

/// What the processor asks of the connection.
enum ToSession {
    /// PUBACKs for messages now durable, in the order they arrived.
    Acknowledge(Vec<AckId>),
    /// The buffer failed: reconnect, so the broker redelivers.
    Redeliver,
}

/// How a connection's session ended, other than by a broken connection.
enum Ended {
    Shutdown,
    ProcessorStopped,
}

async fn run(config: MqttConfig, ctx: SourceContext) -> Result<(), SourceError> {
    let name = config.name.clone();
    let fatal = |message: String| SourceError::Fatal {
        source_name: name.clone(),
        message,
    };
    let settings = settings(&config).map_err(fatal)?;
    // Published messages carry their real topic, so only the SUBSCRIBE
    // names the share; routing below matches the plain filters.
    let mut subscribe = Subscribe::new_many(config.subscriptions.iter().map(|s| {
        let filter = match &config.shared_group {
            Some(group) => format!("$share/{group}/{}", s.topic),
            None => s.topic.clone(),
        };
        SubscribeFilter::new(filter, qos(s.qos))
    }));
    // The only packet id the agent ever picks (0 is not a valid one): one
    // SUBSCRIBE per connection, and no publishing.
    subscribe.pkid = 1;
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
    let (tx, rx) = mpsc::channel::<Delivery>(PROCESSOR_QUEUE);
    // Unbounded, but never long: the session takes it first on every turn,
    // and MQTT bounds what is unacknowledged at 65,535 messages.
    let (to_session, mut from_processor) = mpsc::unbounded_channel::<ToSession>();
    let mut processor = tokio::spawn(process(rx, to_session, ctx.clone(), routes, name.clone()));
    let mut session = Session {
        name: name.clone(),
        ctx: ctx.clone(),
        tx,
        overflow: VecDeque::new(),
        connection_id: 0,
        backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(30)),
    };
    let mut open: Option<Connection> = None;
    loop {
        let opened = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            opened = Connection::open(&settings) => opened,
        };
        let result = match opened {
            Ok((mut connection, session_present)) => {
                session.connection_id += 1;
                tracing::info!(source = %name, host = %config.host, port = config.port, session_present, "MQTT connected");
                // One SUBSCRIBE for every filter, so one SUBACK says the
                // source is receiving; `source_up` waits for it because a
                // broker discards what is published before a subscription.
                let subscribed = connection
                    .send(&[Packet::Subscribe(subscribe.clone())])
                    .await;
                let result = match subscribed {
                    Ok(()) => {
                        session
                            .serve(
                                &mut connection,
                                &mut from_processor,
                                &mut processor,
                                &subscribe,
                                settings.keep_alive,
                            )
                            .await
                    }
                    Err(e) => Err(e),
                };
                if result.is_ok() {
                    open = Some(connection);
                }
                result
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(Ended::Shutdown) => break,
            Ok(Ended::ProcessorStopped) => {
                return Err(fatal("the message processor stopped".into()));
            }
            Err(e) => {
                ctx.metrics.source_up(&name, false);
                ctx.metrics.source_reconnect(&name);
                let delay = session.backoff.next_delay();
                tracing::warn!(source = %name, error = %e, retry_in_ms = delay.as_millis() as u64, "MQTT connection failed");
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    ctx.metrics.source_queued(&name).set(0);
    // Shutdown: take no more messages, let the processor make the received
    // ones durable and acknowledge them on the open connection. Messages
    // not acknowledged stay with the broker for next time.
    let connection_id = session.connection_id;
    drop(session);
    let deadline = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(deadline);
    let mut discarded = Vec::new();
    loop {
        tokio::select! {
            biased;
            message = from_processor.recv() => match (message, open.as_mut()) {
                (None, _) => break,
                (Some(ToSession::Acknowledge(ids)), Some(connection)) => {
                    if connection.acknowledge(&current_ids(&ids, connection_id)).await.is_err() {
                        open = None;
                    }
                }
                (Some(_), _) => {}
            },
            _ = &mut deadline => break,
            // Keep reading so the broker's PINGRESPs and anything else it
            // sends do not back up; messages read now are not acknowledged.
            read = async {
                match open.as_mut() {
                    Some(connection) => connection.read_packets(&mut discarded, usize::MAX).await,
                    None => std::future::pending().await,
                }
            } => {
                discarded.clear();
                if read.is_err() {
                    open = None;
                }
            }
        }
    }
    if let Some(connection) = open.as_mut() {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            connection.send(&[Packet::Disconnect]),
        )
        .await;
    }
    ctx.metrics.source_up(&name, false);
    Ok(())
}

/// The packet ids among `ids` that came on `connection`.
fn current_ids(ids: &[AckId], connection: u32) -> Vec<u16> {
    ids.iter()
        .filter(|id| id.connection == connection)
        .map(|id| id.pkid)
        .collect()
}

/// The connection side of the source: hands messages to the processor and
/// sends its PUBACKs.
struct Session {
    name: String,
    ctx: SourceContext,
    tx: mpsc::Sender<Delivery>,
    /// QoS 1 messages the processor has no room for yet, in arrival order.
    /// The connection keeps being served meanwhile, so keepalives and the
    /// processor's PUBACKs go out. At `MAX_WAITING` the socket is left
    /// unread until the processor catches up, and TCP pushes back on the
    /// broker. The processor never waits for the connection, so it always
    /// drains this queue. Kept across reconnections: these messages are
    /// received, and with a clean session the broker has forgotten them.
    overflow: VecDeque<Delivery>,
    /// Counts connections, so PUBACKs go only where their message came from.
    connection_id: u32,
    backoff: Backoff,
}

impl Session {
    /// Serves one open connection until shutdown, or until it fails.
    async fn serve(
        &mut self,
        connection: &mut Connection,
        from_processor: &mut mpsc::UnboundedReceiver<ToSession>,
        processor: &mut tokio::task::JoinHandle<()>,
        subscribe: &Subscribe,
        keep_alive: Duration,
    ) -> Result<Ended, SessionError> {
        let name = self.name.clone();
        let queued = self.ctx.metrics.source_queued(&name);
        let mut packets = Vec::new();
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + keep_alive, keep_alive);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut awaiting_pingresp = false;
        // Own handles, so the branches do not hold `self` while their
        // handlers use it.
        let shutdown = self.ctx.shutdown.clone();
        let tx = self.tx.clone();
        loop {
            queued.set((self.overflow.len() + PROCESSOR_QUEUE - self.tx.capacity()) as i64);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(Ended::Shutdown),
                Some(message) = from_processor.recv() => {
                    let mut ids = Vec::new();
                    let mut redeliver = false;
                    let mut take = |message| match message {
                        ToSession::Acknowledge(more) => ids.extend(current_ids(&more, self.connection_id)),
                        ToSession::Redeliver => redeliver = true,
                    };
                    take(message);
                    // Every PUBACK that is due goes out in one write.
                    while let Ok(message) = from_processor.try_recv() {
                        take(message);
                    }
                    connection.acknowledge(&ids).await?;
                    if redeliver {
                        return Err(SessionError::Redeliver);
                    }
                }
                permit = tx.reserve(), if !self.overflow.is_empty() => match permit {
                    Ok(permit) => {
                        if let Some(delivery) = self.overflow.pop_front() {
                            permit.send(delivery);
                        }
                    }
                    Err(_) => return Ok(Ended::ProcessorStopped),
                },
                // At most what the overflow has room for: a read of small
                // messages holds hundreds, which stay unparsed until asked.
                read = connection.read_packets(&mut packets, MAX_WAITING - self.overflow.len()), if self.overflow.len() < MAX_WAITING => {
                    read?;
                    for packet in packets.drain(..) {
                        match packet {
                            Packet::Publish(publish) => {
                                if !self.deliver(publish) {
                                    return Ok(Ended::ProcessorStopped);
                                }
                            }
                            Packet::SubAck(ack) => self.subscribed(subscribe, &ack),
                            Packet::PingResp => awaiting_pingresp = false,
                            other => tracing::debug!(source = %name, packet = mqtt_session::kind(&other), "ignored a packet from the broker"),
                        }
                    }
                }
                _ = ping.tick() => {
                    // While the socket is left unread the PINGRESP waits in
                    // it; the broker, not us, ends a session gone quiet then.
                    if awaiting_pingresp && self.overflow.len() < MAX_WAITING {
                        return Err(SessionError::KeepAlive(keep_alive));
                    }
                    connection.send(&[Packet::PingReq]).await?;
                    awaiting_pingresp = true;
                }
                _ = &mut *processor => return Ok(Ended::ProcessorStopped),
            }
        }
    }

    /// Hands a message to the processor; false once the processor is gone.
    fn deliver(&mut self, publish: Publish) -> bool {
        let delivery = Delivery {
            connection: self.connection_id,
            publish,
        };
        if delivery.publish.qos == QoS::AtMostOnce {
            // QoS 0 has no broker-side flow control: never let it stall
            // the connection (and with it keepalives).
            if self.tx.try_send(delivery).is_err() {
                self.ctx.metrics.dropped("qos0_overflow", 1);
            }
            return true;
        }
        if !self.overflow.is_empty() {
            self.overflow.push_back(delivery);
            return true;
        }
        match self.tx.try_send(delivery) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(delivery)) => {
                self.overflow.push_back(delivery);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    fn subscribed(&mut self, subscribe: &Subscribe, ack: &SubAck) {
        let mut all_granted = true;
        for (filter, code) in subscribe.filters.iter().zip(&ack.return_codes) {
            if matches!(code, SubscribeReasonCode::Failure) {
                all_granted = false;
                tracing::error!(source = %self.name, topic = %filter.path, "the broker refused the subscription");
            }
        }
        tracing::info!(source = %self.name, subscriptions = subscribe.filters.len(), all_granted, "MQTT subscribed");
        self.backoff.reset();
        self.ctx.metrics.source_up(&self.name, true);
    }
}

fn qos(level: u8) -> QoS {
    if level == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

fn settings(config: &MqttConfig) -> Result<Settings, String> {
    let login = match &config.username {
        Some(user) => {
            let password = match &config.password_file {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read passwordFile {path}: {e}"))?
                    .trim_end()
                    .to_string(),
                None => String::new(),
            };
            Some(Login::new(user, password))
        }
        None => None,
    };
    let tls = match &config.tls {
        Some(tls) => {
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
            Some(Arc::new(client_config))
        }
        None => None,
    };
    Ok(Settings {
        host: config.host.clone(),
        port: config.port,
        client_id: config.client_id.clone(),
        clean_session: config.clean_session,
        keep_alive: Duration::from_secs(config.keep_alive_secs.into()),
        login,
        tls,
    })
}

type Pending = BoxFuture<
    'static,
    (
        Vec<AckId>,
        Result<Vec<Option<Outcome>>, edgefleet_buffer::BufferError>,
    ),
>;

/// Decodes messages, appends them in groups and acknowledges them in order.
async fn process(
    mut rx: mpsc::Receiver<Delivery>,
    to_session: mpsc::UnboundedSender<ToSession>,
    ctx: SourceContext,
    routes: Arc<Vec<Route>>,
    name: String,
) {
    // The keys' bytes on disk, as every version of the source wrote them:
    // the source's name, `/`, the packet id.
    let scope = ctx.buffer.dedupe_scope(format!("{name}/"));
    let mut pending: FuturesOrdered<Pending> = FuturesOrdered::new();
    let mut deliveries = Vec::new();
    let mut open = true;
    while open || !pending.is_empty() {
        tokio::select! {
            biased;
            Some((ack_ids, result)) = pending.next(), if !pending.is_empty() => {
                acknowledge(&to_session, &ctx, &name, ack_ids, result).await;
            }
            // `recv_many` takes what is queued at once, and frees the
            // channel's slots in one step instead of one per message.
            _ = rx.recv_many(&mut deliveries, MAX_MESSAGES_PER_APPEND), if open && pending.len() < MAX_APPENDS_IN_FLIGHT => {
                if deliveries.is_empty() {
                    open = false;
                    continue;
                }
                pending.push_back(append(&ctx, &routes, &name, scope, std::mem::take(&mut deliveries)));
            }
        }
    }
}

fn append(
    ctx: &SourceContext,
    routes: &[Route],
    name: &str,
    scope: DedupeScope,
    deliveries: Vec<Delivery>,
) -> Pending {
    // `None` marks a message that did not decode: it is dead-lettered and
    // acknowledged in its turn, and never blocks the ones behind it.
    let mut slots = Vec::with_capacity(deliveries.len());
    // Records are about as long as their payloads.
    let payload_bytes = deliveries.iter().map(|d| d.publish.payload.len()).sum();
    let mut batch = AppendBatch::with_capacity(deliveries.len(), payload_bytes);
    let mut signals = RecordWriter::new();
    let mut json = json::JsonReader::default();
    let mut fingerprinter = fingerprint::Fingerprinter::default();
    for Delivery { publish, .. } in &deliveries {
        match write_record(routes, name, publish, &mut json, &mut signals, &mut batch) {
            Ok(()) => {
                if publish.qos != QoS::AtMostOnce {
                    batch.dedupe_last(DedupeKey {
                        scope,
                        id: publish.pkid,
                        fingerprint: fingerprinter.of(&publish.topic, &publish.payload),
                        earlier_fingerprint: publish
                            .dup
                            .then(|| fingerprint::sha256_v1(&publish.topic, &publish.payload)),
                        redelivery: publish.dup,
                    });
                }
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
    // The messages themselves are dropped here: their payloads are slices
    // of the connection's read buffer, which they would keep alive until
    // the append is durable.
    let ack_ids: Vec<AckId> = deliveries
        .iter()
        .filter(|d| d.publish.qos != QoS::AtMostOnce)
        .map(|d| AckId {
            connection: d.connection,
            pkid: d.publish.pkid,
        })
        .collect();
    drop(deliveries);
    let buffer = ctx.buffer.clone();
    Box::pin(async move {
        let result = if batch.is_empty() {
            Ok(Vec::new())
        } else {
            buffer.append(batch).await
        };
        let result = result.map(|outcomes| {
            let mut outcomes = outcomes.into_iter();
            slots
                .into_iter()
                .map(|decoded| if decoded { outcomes.next() } else { None })
                .collect()
        });
        (ack_ids, result)
    })
}

async fn acknowledge(
    to_session: &mpsc::UnboundedSender<ToSession>,
    ctx: &SourceContext,
    name: &str,
    ack_ids: Vec<AckId>,
    result: Result<Vec<Option<Outcome>>, edgefleet_buffer::BufferError>,
) {
    match result {
        Ok(outcomes) => {
            let stored = outcomes
                .iter()
                .filter(|o| matches!(o, Some(Outcome::Stored(_))))
                .count();
            ctx.metrics.records_in(name, stored as u64);
            let _ = to_session.send(ToSession::Acknowledge(ack_ids));
        }
        Err(e) => {
            // Not acknowledged, so the broker keeps the messages; reconnect so
            // it redelivers them once the buffer can take them again.
            tracing::error!(source = %name, error = %e, messages = ack_ids.len(), "cannot buffer messages; leaving them with the broker");
            ctx.metrics.dropped("buffer_error_retried", 0);
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = to_session.send(ToSession::Redeliver);
        }
    }
}

/// The record of one message, written straight to its wire form at the end
/// of `batch` (the buffer stores it as it is); nothing is written if the
/// message does not decode.
fn write_record(
    routes: &[Route],
    name: &str,
    publish: &Publish,
    json: &mut json::JsonReader,
    signals: &mut RecordWriter,
    batch: &mut AppendBatch,
) -> Result<(), String> {
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
    match route.payload {
        PayloadFormat::Json => {
            let timestamp_ns = json
                .decode_into(&publish.payload, signals)
                .map_err(|e| e.to_string())?;
            signals.finish_to(
                batch.records_mut(),
                name,
                device_id,
                timestamp_ns.unwrap_or_else(crate::now_ns),
            );
        }
        PayloadFormat::Raw => RecordWriter::raw_to(
            batch.records_mut(),
            name,
            device_id,
            crate::now_ns(),
            &publish.payload,
            &route.content_type,
        ),
    }
    Ok(())
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
