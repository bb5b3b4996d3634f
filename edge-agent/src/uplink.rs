//! The uplink: one bidirectional gRPC stream to the ingest over mutual TLS.
//!
//! It reads durable records from the buffer in order, sends them in batches
//! within the credit the ingest grants, and deletes records from the buffer
//! only when the ingest acknowledges them. Any failure ends the session;
//! the next one starts after an exponential backoff with full jitter and
//! resumes from what the ingest says it has stored.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgefleet_buffer::{Buffer, BufferError, ReadBatch};
use edgefleet_config::{Compression, UplinkConfig};
use edgefleet_pki::Principal;
use edgefleet_proto::batch_zstd::{self, BatchCompressor};
use edgefleet_proto::encoded::telemetry_client::TelemetryClient;
use edgefleet_proto::encoded::{AgentFrame, AgentFrameKind};
use edgefleet_proto::{ingest_message, Goodbye, Heartbeat, Hello, HelloAck};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::metrics::Metrics;

/// Exponential backoff with full jitter: each delay is uniform in
/// `[0, min(max, initial * 2^attempt)]`, so a fleet reconnecting after an
/// ingest outage spreads out instead of arriving at once.
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            attempt: 0,
        }
    }
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32.checked_shl(self.attempt).unwrap_or(u32::MAX))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(rand::random::<f64>())
    }
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("TLS material: {0}")]
    Tls(#[from] edgefleet_pki::PkiError),
    #[error("connecting to {endpoint}: {message}")]
    Connect { endpoint: String, message: String },
    #[error("the client certificate is {found}'s, but agent.id expects `{expected}`")]
    WrongCertificate { expected: String, found: String },
    #[error("the ingest refused the session: {0}")]
    Refused(String),
    #[error("stream failed: {0}")]
    Stream(String),
    #[error("protocol violation by the ingest: {0}")]
    Protocol(String),
    #[error("no acknowledgement within {0:?}")]
    AckTimeout(Duration),
    #[error(transparent)]
    Buffer(#[from] BufferError),
}

enum SessionEnd {
    Shutdown,
    GoAway(Duration),
}

pub struct Uplink {
    pub config: UplinkConfig,
    pub buffer: Buffer,
    pub metrics: Arc<Metrics>,
    pub config_hash: String,
    /// This gateway's node name: with a site certificate the agent streams
    /// as `<node>@<site>`.
    pub node: String,
    /// `agent.id`: the agent or site name the certificate must carry.
    pub expected_identity: Option<String>,
}

/// The agent's identity as its certificate states it.
pub fn certificate_identity(
    config: &UplinkConfig,
) -> Result<edgefleet_pki::identity::CertIdentity, edgefleet_pki::PkiError> {
    let certs = edgefleet_pki::load::certs(std::path::Path::new(&config.cert_file))?;
    edgefleet_pki::agent_identity(&certs[0])
}

impl Uplink {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(
            Duration::from_millis(self.config.backoff.initial_ms),
            Duration::from_millis(self.config.backoff.max_ms),
        );
        // The highest sequence number this run has handed to the network,
        // over all sessions.
        let mut handed_through = 0;
        loop {
            let mut progressed = false;
            let result = self
                .session(&shutdown, &mut progressed, &mut handed_through)
                .await;
            self.metrics.uplink_connected(false);
            // With the link down, what was reserved for the window ahead
            // must not keep the newest records from DropOldest's place.
            if let Err(e) = self.buffer.release_unsent(handed_through).await {
                tracing::warn!(error = %e, "could not release the buffer's send reservation");
            }
            if progressed {
                backoff.reset();
            }
            let delay = match result {
                Ok(SessionEnd::Shutdown) => return,
                Ok(SessionEnd::GoAway(after)) => {
                    tracing::info!(
                        retry_in_ms = after.as_millis() as u64,
                        "ingest is going away; reconnecting"
                    );
                    after
                }
                Err(e) => {
                    self.metrics.uplink_reconnect();
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, endpoint = %self.config.endpoint, "uplink session ended; buffering until it is back");
                    delay
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn tls(&self) -> Result<ClientTlsConfig, UplinkError> {
        // Read at every session, so renewed certificates are picked up
        // without a restart.
        let ca = edgefleet_pki::load::cert_pem(std::path::Path::new(&self.config.ca_file))?;
        let cert = edgefleet_pki::load::cert_pem(std::path::Path::new(&self.config.cert_file))?;
        let key = edgefleet_pki::load::key_pem(std::path::Path::new(&self.config.key_file))?;
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key));
        if let Some(name) = &self.config.server_name {
            tls = tls.domain_name(name.clone());
        }
        Ok(tls)
    }

    async fn session(
        &self,
        shutdown: &CancellationToken,
        progressed: &mut bool,
        handed_through: &mut u64,
    ) -> Result<SessionEnd, UplinkError> {
        let cfg = &self.config;
        let identity = certificate_identity(cfg)?;
        if let Some(expected) = &self.expected_identity {
            let (Principal::Agent(name) | Principal::Site(name)) = &identity.principal;
            if name != expected {
                return Err(UplinkError::WrongCertificate {
                    expected: expected.clone(),
                    found: identity.principal.to_string(),
                });
            }
        }
        let connect_timeout = Duration::from_millis(cfg.connect_timeout_ms);
        let keepalive = Duration::from_millis(cfg.keepalive_ms);
        let connect_err = |message: String| UplinkError::Connect {
            endpoint: cfg.endpoint.clone(),
            message,
        };
        let endpoint = Endpoint::from_shared(cfg.endpoint.clone())
            .map_err(|e| connect_err(error_chain(&e)))?
            .tls_config(self.tls()?)
            .map_err(|e| connect_err(error_chain(&e)))?
            .connect_timeout(connect_timeout)
            .http2_keep_alive_interval(keepalive)
            .keep_alive_timeout(keepalive)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(8 << 20));
        let channel = tokio::select! {
            _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
            r = tokio::time::timeout(connect_timeout, endpoint.connect()) => r
                .map_err(|_| connect_err("timed out".into()))?
                .map_err(|e| connect_err(error_chain(&e)))?,
        };
        // No `accept_compressed`: the ingest sends acks of a few bytes, and
        // gRPC compression would build a zstd context for each of them.
        let mut client = TelemetryClient::new(channel)
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(64 << 20);
        // zstd is applied to each batch's records below, with one context
        // for the whole stream, once the ingest says it takes them.
        if cfg.compression == Compression::Gzip {
            client = client.send_compressed(CompressionEncoding::Gzip);
        }

        let (tx, rx) = mpsc::channel::<AgentFrame>(64);
        let stats = self.buffer.stats();
        let hello = Hello {
            protocol_revision: edgefleet_proto::PROTOCOL_REVISION,
            agent_id: identity.principal.stream_id(&self.node),
            agent_version: crate::VERSION.into(),
            config_hash: self.config_hash.clone(),
            buffer_epoch: stats.epoch,
            buffer_anchored: stats.anchored,
            first_unacked_seq: stats.first_seq,
            next_seq: stats.next_seq,
        };
        send(&tx, AgentFrameKind::Hello(hello)).await?;
        let response =
            tokio::time::timeout(connect_timeout, client.stream(ReceiverStream::new(rx)))
                .await
                .map_err(|_| connect_err("no response to the stream request".into()))?
                .map_err(status_error)?;
        let mut inbound = response.into_inner();
        let hello_ack = match tokio::time::timeout(connect_timeout, inbound.message()).await {
            Err(_) => return Err(UplinkError::Protocol("no HelloAck in time".into())),
            Ok(Err(status)) => return Err(status_error(status)),
            Ok(Ok(Some(edgefleet_proto::IngestMessage {
                kind: Some(ingest_message::Kind::HelloAck(ack)),
            }))) => ack,
            Ok(Ok(other)) => {
                return Err(UplinkError::Protocol(format!(
                    "expected HelloAck, got {other:?}"
                )))
            }
        };
        let anchor = self.buffer.anchor(hello_ack.stored_through).await?;
        if hello_ack.stored_through > 0 {
            self.buffer.ack(hello_ack.stored_through).await?;
        }
        self.metrics.uplink_connected(true);
        self.metrics.acked(0, hello_ack.stored_through);
        tracing::info!(
            agent_id = %hello_ack.agent_id,
            stored_through = hello_ack.stored_through,
            credit = hello_ack.credit,
            ?anchor,
            ingest_version = %hello_ack.ingest_version,
            "uplink session established"
        );

        let mut compressor = batch_compressor(cfg.compression, &hello_ack);
        let max_records = cfg.batch.max_records as usize;
        let max_bytes = (cfg.batch.max_bytes.0 as usize)
            .min((hello_ack.max_message_bytes as usize).saturating_mul(3) / 4)
            .max(1024);
        let linger = Duration::from_millis(cfg.batch.max_delay_ms);
        let ack_timeout = Duration::from_millis(cfg.ack_timeout_ms);
        let heartbeat_every =
            Duration::from_millis(u64::from(hello_ack.heartbeat_interval_ms.max(1000)));
        let mut credit = hello_ack.credit.max(1) as usize;
        let window = credit;
        // A window's worth of records reserved as sent at a time: one buffer
        // commit per window rather than one per batch.
        let reserve_ahead = (max_records * credit) as u64;
        let mut cursor = (hello_ack.stored_through + 1).max(self.buffer.stats().first_seq);
        let mut inflight: VecDeque<(u64, u64, Instant)> = VecDeque::new();
        let mut last_sent = Instant::now();

        loop {
            let ack_deadline = inflight
                .front()
                .map(|(_, _, at)| tokio::time::Instant::from_std(*at + ack_timeout));
            tokio::select! {
                _ = shutdown.cancelled() => {
                    self.say_goodbye(&tx, &mut inbound, &mut inflight).await;
                    return Ok(SessionEnd::Shutdown);
                }
                message = inbound.message() => {
                    let message = message.map_err(status_error)?
                        .ok_or_else(|| UplinkError::Stream("the ingest ended the stream".into()))?;
                    match message.kind {
                        Some(ingest_message::Kind::Ack(ack)) => {
                            self.on_ack(ack.acked_through, &mut inflight)?;
                            credit += ack.credit as usize;
                            *progressed = true;
                        }
                        Some(ingest_message::Kind::GoAway(go)) => {
                            tracing::info!(reason = %go.reason, "ingest sent GoAway");
                            return Ok(SessionEnd::GoAway(Duration::from_millis(go.retry_after_ms.into())));
                        }
                        Some(ingest_message::Kind::Command(_)) => {
                            send(&tx, AgentFrameKind::Heartbeat(self.heartbeat())).await?;
                        }
                        other => return Err(UplinkError::Protocol(format!("unexpected {other:?}"))),
                    }
                }
                ready = self.buffer.wait_for(cursor), if credit > 0 => {
                    ready?;
                    let available = self.buffer.stats().durable_through.saturating_sub(cursor) + 1;
                    // Wait for a fuller batch only while half the window is
                    // in flight: with credit to spare a partial batch goes at
                    // once (the buffer's group commit already gathered it),
                    // so light load pays no linger in its latency.
                    if (available as usize) < max_records
                        && !linger.is_zero()
                        && inflight.len() * 2 >= window
                    {
                        tokio::time::sleep(linger).await;
                    }
                    let Some(ReadBatch { batch, records, framed, last }) =
                        self.buffer.read_batch(cursor, max_records, max_bytes, compressor.as_mut())?
                    else {
                        // Everything from the cursor was acked or dropped meanwhile.
                        cursor = self.buffer.stats().durable_through + 1;
                        continue;
                    };
                    if records == 0 {
                        // Every record read was malformed and skipped (counted).
                        cursor = last + 1;
                        continue;
                    }
                    self.buffer.before_send_ahead(last, reserve_ahead).await?;
                    *handed_through = (*handed_through).max(last);
                    let count = records as u64;
                    self.metrics.sent(count, framed as u64, !batch.records.is_empty());
                    send(&tx, AgentFrameKind::Batch(batch)).await?;
                    inflight.push_back((last, count, Instant::now()));
                    credit -= 1;
                    cursor = last + 1;
                    last_sent = Instant::now();
                }
                _ = sleep_until(ack_deadline), if ack_deadline.is_some() => {
                    return Err(UplinkError::AckTimeout(ack_timeout));
                }
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(last_sent + heartbeat_every)) => {
                    // Idle for a heartbeat interval: give the context's MiB back.
                    if let Some(compressor) = compressor.as_mut() {
                        compressor.release();
                    }
                    send(&tx, AgentFrameKind::Heartbeat(self.heartbeat())).await?;
                    last_sent = Instant::now();
                }
            }
        }
    }

    fn on_ack(
        &self,
        through: u64,
        inflight: &mut VecDeque<(u64, u64, Instant)>,
    ) -> Result<(), UplinkError> {
        self.buffer.ack_soon(through)?;
        let mut records = 0;
        while inflight
            .front()
            .is_some_and(|(last, _, _)| *last <= through)
        {
            records += inflight.pop_front().map(|(_, n, _)| n).unwrap_or(0);
        }
        self.metrics.acked(records, through);
        Ok(())
    }

    fn heartbeat(&self) -> Heartbeat {
        let stats = self.buffer.stats();
        Heartbeat {
            buffered_records: stats.records,
            buffered_bytes: stats.bytes,
            sent_at_ns: crate::now_ns(),
        }
    }

    /// Ends the session cleanly: waits (briefly) for acks of what is in
    /// flight, so a graceful shutdown does not leave records to resend.
    async fn say_goodbye(
        &self,
        tx: &mpsc::Sender<AgentFrame>,
        inbound: &mut tonic::Streaming<edgefleet_proto::IngestMessage>,
        inflight: &mut VecDeque<(u64, u64, Instant)>,
    ) {
        let _ = send(
            tx,
            AgentFrameKind::Goodbye(Goodbye {
                reason: "agent shutting down".into(),
            }),
        )
        .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !inflight.is_empty() {
            match tokio::time::timeout_at(deadline, inbound.message()).await {
                Ok(Ok(Some(edgefleet_proto::IngestMessage {
                    kind: Some(ingest_message::Kind::Ack(ack)),
                }))) => {
                    if self.on_ack(ack.acked_through, inflight).is_err() {
                        break;
                    }
                }
                Ok(Ok(Some(_))) => {}
                _ => break,
            }
        }
    }
}

/// The stream's compressor when the configuration asks for zstd and the
/// ingest takes compressed batches; an older ingest gets them uncompressed.
/// (gzip is gRPC's, set on the client.)
pub fn batch_compressor(compression: Compression, hello_ack: &HelloAck) -> Option<BatchCompressor> {
    let offered = hello_ack
        .batch_encodings
        .iter()
        .any(|e| e == batch_zstd::ENCODING);
    match compression {
        Compression::Zstd if offered => Some(BatchCompressor::default()),
        Compression::Zstd => {
            tracing::warn!(
                ingest_version = %hello_ack.ingest_version,
                "the ingest does not take zstd-compressed batches; sending them uncompressed"
            );
            None
        }
        Compression::Gzip | Compression::None => None,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn send(tx: &mpsc::Sender<AgentFrame>, kind: AgentFrameKind) -> Result<(), UplinkError> {
    tx.send(AgentFrame::new(kind))
        .await
        .map_err(|_| UplinkError::Stream("the stream closed".into()))
}

fn status_error(status: tonic::Status) -> UplinkError {
    use tonic::Code;
    let text = format!("{:?}: {}", status.code(), status.message());
    let detail = std::error::Error::source(&status)
        .map(|s| format!(" ({})", error_chain(s)))
        .unwrap_or_default();
    match status.code() {
        Code::PermissionDenied
        | Code::Unauthenticated
        | Code::InvalidArgument
        | Code::ResourceExhausted => UplinkError::Refused(format!("{text}{detail}")),
        _ => UplinkError::Stream(format!("{text}{detail}")),
    }
}

/// An error and its causes on one line: TLS failures are only useful with
/// the innermost cause ("certificate expired", "unknown issuer").
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::{batch_compressor, Backoff};
    use edgefleet_config::Compression;
    use edgefleet_proto::HelloAck;
    use std::time::Duration;

    #[test]
    fn batches_are_compressed_only_with_zstd_configured_and_offered() {
        let offering = HelloAck {
            batch_encodings: vec!["zstd".into()],
            ..HelloAck::default()
        };
        let older = HelloAck::default();
        assert!(batch_compressor(Compression::Zstd, &offering).is_some());
        assert!(batch_compressor(Compression::Zstd, &older).is_none());
        assert!(batch_compressor(Compression::Gzip, &offering).is_none());
        assert!(batch_compressor(Compression::None, &offering).is_none());
    }

    #[test]
    fn backoff_grows_to_its_ceiling_with_jitter_below_it() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[0] <= Duration::from_millis(100));
        // Full jitter: not all late delays sit at the ceiling.
        assert!(delays[10..]
            .iter()
            .any(|d| *d < Duration::from_millis(1900)));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
