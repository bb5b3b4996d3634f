//! A minimal agent on the wire: one mTLS gRPC stream speaking
//! `edgefleet.telemetry.v1` (Hello, batches within credit, acks), with no
//! buffer behind it. Used for the transport-alone rate and for fan-in.

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use edgefleet_proto::batch_zstd::BatchCompressor;
use edgefleet_proto::encoded::telemetry_client::TelemetryClient;
use edgefleet_proto::encoded::{AgentFrame, AgentFrameKind, BatchBuilder};
use edgefleet_proto::{ingest_message, EncodedRecord, Hello, IngestMessage, RecordWriter};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::CompressionEncoding;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The record the MQTT source makes of [`crate::mqtt::payload`], as it
/// hands it to the buffer (encoded, without `seq`).
pub fn sample_encoded(device: u32, n: u64) -> EncodedRecord {
    let body = crate::mqtt::payload(n, device, crate::mqtt::now_ns());
    let mut signals = RecordWriter::new();
    let timestamp_ns = edge_agent::sources::json::JsonReader::default()
        .decode_into(body.as_bytes(), &mut signals)
        .expect("sample payload");
    signals.finish(
        "mqtt",
        &format!("dev-{device:05}"),
        timestamp_ns.unwrap_or_default(),
    )
}

pub struct AgentStream {
    tx: mpsc::Sender<AgentFrame>,
    inbound: tonic::Streaming<IngestMessage>,
    credit: usize,
    next_seq: u64,
    /// (last seq, records, sent at) of batches awaiting their ack.
    inflight: VecDeque<(u64, u64, Instant)>,
    pub acked_records: u64,
    compressor: Option<BatchCompressor>,
}

impl AgentStream {
    pub async fn connect(
        port: u16,
        ca: &Path,
        cert: &Path,
        key: &Path,
        agent_id: &str,
    ) -> anyhow::Result<AgentStream> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(ca)?))
            .identity(Identity::from_pem(
                std::fs::read(cert)?,
                std::fs::read(key)?,
            ))
            .domain_name("localhost");
        let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(8 << 20))
            .connect()
            .await
            .context("connecting")?;
        let mut client = TelemetryClient::new(channel)
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(64 << 20);
        // Compressed as the agent's uplink compresses by default: zstd inside
        // the batch (below), gzip by gRPC.
        let compression = edgefleet_config::Compression::default();
        if compression == edgefleet_config::Compression::Gzip {
            client = client.send_compressed(CompressionEncoding::Gzip);
        }
        let (tx, rx) = mpsc::channel::<AgentFrame>(64);
        tx.send(AgentFrame {
            kind: Some(AgentFrameKind::Hello(Hello {
                protocol_revision: edgefleet_proto::PROTOCOL_REVISION,
                agent_id: agent_id.into(),
                agent_version: env!("CARGO_PKG_VERSION").into(),
                config_hash: "bench".into(),
                buffer_epoch: 1,
                buffer_anchored: true,
                first_unacked_seq: 1,
                next_seq: 1,
            })),
        })
        .await?;
        let mut inbound = client
            .stream(ReceiverStream::new(rx))
            .await
            .context("opening the stream")?
            .into_inner();
        let hello_ack = match inbound.message().await? {
            Some(IngestMessage {
                kind: Some(ingest_message::Kind::HelloAck(ack)),
            }) => ack,
            other => bail!("expected HelloAck, got {other:?}"),
        };
        let compressor = edge_agent::uplink::batch_compressor(compression, &hello_ack);
        Ok(AgentStream {
            compressor,
            tx,
            inbound,
            credit: hello_ack.credit.max(1) as usize,
            next_seq: hello_ack.stored_through + 1,
            inflight: VecDeque::new(),
            acked_records: 0,
        })
    }

    pub fn can_send(&self) -> bool {
        self.credit > 0
    }

    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Sends `template`'s records (encoded without `seq`, as the agent's
    /// buffer holds them) as one batch with the next sequence numbers,
    /// numbered the way the agent's uplink numbers them.
    pub async fn send(&mut self, template: &[EncodedRecord]) -> anyhow::Result<()> {
        let bytes = template.iter().map(EncodedRecord::len).sum();
        let mut batch = BatchBuilder::with_capacity(template.len(), bytes);
        for (i, encoded) in template.iter().enumerate() {
            batch.push(encoded.as_bytes(), self.next_seq + i as u64);
        }
        let batch = match self.compressor.as_mut() {
            Some(compressor) => compressor.compress(batch.finish())?,
            None => batch.finish(),
        };
        let count = template.len() as u64;
        self.next_seq += count;
        self.tx
            .send(AgentFrame::new(AgentFrameKind::Batch(batch)))
            .await
            .map_err(|_| anyhow::anyhow!("the stream closed"))?;
        self.inflight
            .push_back((self.next_seq - 1, count, Instant::now()));
        self.credit -= 1;
        Ok(())
    }

    /// Waits for the next ack; returns the ack latency of each batch it covers.
    pub async fn next_ack(&mut self) -> anyhow::Result<Vec<Duration>> {
        loop {
            let message = self
                .inbound
                .message()
                .await?
                .context("the ingest ended the stream")?;
            match message.kind {
                Some(ingest_message::Kind::Ack(ack)) => {
                    self.credit += ack.credit as usize;
                    let mut latencies = Vec::new();
                    while self
                        .inflight
                        .front()
                        .is_some_and(|(last, _, _)| *last <= ack.acked_through)
                    {
                        let (_, n, at) = self.inflight.pop_front().expect("front");
                        self.acked_records += n;
                        latencies.push(at.elapsed());
                    }
                    return Ok(latencies);
                }
                Some(ingest_message::Kind::GoAway(go)) => bail!("GoAway: {}", go.reason),
                _ => continue,
            }
        }
    }
}
