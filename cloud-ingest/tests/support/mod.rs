//! Shared pieces of the integration tests: a dev PKI in a temp dir, an
//! in-process server on 127.0.0.1:0, and a tonic client over real mTLS.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cloud_ingest::metrics::Metrics;
use cloud_ingest::query::{http_get, Stats};
use cloud_ingest::{
    BoundAddrs, CancellationToken, EmbeddedConfig, Ingest, IngestConfig, IngestError, SinkConfig,
    TlsMode,
};
use edgefleet_pki::dev::DevPki;
use edgefleet_proto::agent_message::Kind as In;
use edgefleet_proto::ingest_message::Kind as Out;
use edgefleet_proto::telemetry_client::TelemetryClient;
use edgefleet_proto::{
    record, AgentMessage, Hello, HelloAck, IngestMessage, Record, RecordBatch, Signal, Signals,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Streaming;

pub const AGENTS: [&str; 2] = ["gw-1", "gw-2"];

/// A temp dir with a dev PKI (agents gw-1 and gw-2) and a store directory.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub pki: DevPki,
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let agents: Vec<String> = AGENTS.iter().map(|s| s.to_string()).collect();
        let pki = edgefleet_pki::dev::init(
            &dir.path().join("pki"),
            &agents,
            &["localhost".into(), "127.0.0.1".into()],
        )
        .unwrap();
        Self { dir, pki }
    }

    pub fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// A config for 127.0.0.1:0 with mTLS, the admin endpoint and a plaintext
    /// health port; short timeouts so failure tests run quickly.
    pub fn config(&self) -> IngestConfig {
        let tls = TlsMode::Mtls {
            cert: self.pki.server_cert(),
            key: self.pki.server_key(),
            client_ca: self.pki.ca_cert(),
        };
        let mut config = IngestConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            tls,
            SinkConfig::Embedded(EmbeddedConfig::new(self.store())),
        );
        config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        config.health_listen = Some("127.0.0.1:0".parse().unwrap());
        config.handshake_timeout = Duration::from_secs(5);
        config.drain_timeout = Duration::from_secs(10);
        config
    }

    pub async fn start(&self) -> Server {
        Server::start(self.config()).await
    }

    /// A client authenticated as `agent` (a certificate in the fixture's PKI).
    pub async fn client(&self, addrs: &BoundAddrs, agent: &str) -> TelemetryClient<Channel> {
        self.client_with(
            addrs,
            &self.pki.agent_cert(agent),
            &self.pki.agent_key(agent),
        )
        .await
    }

    /// A client presenting the certificate and key in these files.
    pub async fn client_with(
        &self,
        addrs: &BoundAddrs,
        cert: &Path,
        key: &Path,
    ) -> TelemetryClient<Channel> {
        let identity =
            Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap());
        connect(addrs, &self.pki.ca_cert(), Some(identity))
            .await
            .unwrap()
    }
}

/// Connects over TLS trusting `ca`, presenting `identity` if given.
pub async fn connect(
    addrs: &BoundAddrs,
    ca: &Path,
    identity: Option<Identity>,
) -> Result<TelemetryClient<Channel>, tonic::transport::Error> {
    Ok(TelemetryClient::new(channel(addrs, ca, identity).await?))
}

/// A TLS channel to the ingest, trusting `ca`, presenting `identity` if given.
pub async fn channel(
    addrs: &BoundAddrs,
    ca: &Path,
    identity: Option<Identity>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("localhost");
    if let Some(identity) = identity {
        tls = tls.identity(identity);
    }
    Endpoint::from_shared(format!("https://127.0.0.1:{}", addrs.grpc.port()))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// A server running in this process.
pub struct Server {
    pub addrs: BoundAddrs,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), IngestError>>,
}

impl Server {
    pub async fn start(config: IngestConfig) -> Server {
        let ingest = Ingest::bind(config).await.unwrap();
        let addrs = ingest.local_addrs();
        let metrics = ingest.metrics();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(ingest.run(shutdown.clone()));
        Server {
            addrs,
            metrics,
            shutdown,
            task,
        }
    }

    /// Graceful shutdown; panics unless `run` returned Ok.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the server did not stop")
            .unwrap()
            .unwrap();
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.addrs.metrics.unwrap())
    }

    pub async fn stats(&self) -> Stats {
        let body = http_get(&self.admin_url(), "/stats").await.unwrap();
        serde_json::from_str(&body).unwrap()
    }

    pub async fn metrics_text(&self) -> String {
        http_get(&self.admin_url(), "/metrics").await.unwrap()
    }

    /// Waits until the metric line `name` (with labels) reads `value`.
    pub async fn wait_metric(&self, series: &str, value: u64) {
        let mut last = String::new();
        for _ in 0..100 {
            last = self.metrics_text().await;
            if metric_value(&last, series) == Some(value) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{series} never reached {value}; metrics:\n{last}");
    }
}

/// The value of one series (`name{labels}`) in a text exposition.
pub fn metric_value(text: &str, series: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?
            .trim()
            .parse::<f64>()
            .ok()
            .map(|v| v as u64)
    })
}

/// One open stream from the agent's side.
pub struct AgentStream {
    pub tx: mpsc::Sender<AgentMessage>,
    pub rx: Streaming<IngestMessage>,
}

impl AgentStream {
    pub async fn open(client: &mut TelemetryClient<Channel>) -> Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::channel(256);
        let response = client.stream(ReceiverStream::new(rx)).await?;
        Ok(Self {
            tx,
            rx: response.into_inner(),
        })
    }

    /// Opens a stream and completes the Hello exchange.
    pub async fn hello(client: &mut TelemetryClient<Channel>, agent: &str) -> (Self, HelloAck) {
        let mut stream = Self::open(client).await.unwrap();
        stream.send(hello(agent)).await;
        match stream.next().await {
            Ok(Some(Out::HelloAck(ack))) => (stream, ack),
            other => panic!("expected HelloAck, got {other:?}"),
        }
    }

    pub async fn send(&self, kind: In) {
        self.tx
            .send(AgentMessage { kind: Some(kind) })
            .await
            .expect("the request stream is closed");
    }

    /// The next message kind, `Ok(None)` at a clean end, or the final status.
    pub async fn next(&mut self) -> Result<Option<Out>, tonic::Status> {
        let msg = tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("no answer from the ingest within 10 s")?;
        Ok(msg.map(|m| m.kind.expect("an IngestMessage without a kind")))
    }

    pub async fn expect_ack(&mut self) -> edgefleet_proto::Ack {
        match self.next().await {
            Ok(Some(Out::Ack(ack))) => ack,
            other => panic!("expected Ack, got {other:?}"),
        }
    }

    /// The status that ends the stream (after any messages, which are discarded).
    pub async fn expect_status(&mut self) -> tonic::Status {
        loop {
            match self.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended cleanly, expected an error status"),
                Err(status) => return status,
            }
        }
    }
}

pub fn hello(agent: &str) -> In {
    In::Hello(Hello {
        protocol_revision: edgefleet_proto::PROTOCOL_REVISION,
        agent_id: agent.to_string(),
        agent_version: "0.1.0-test".into(),
        config_hash: "00".repeat(32),
        buffer_epoch: 7,
        buffer_anchored: true,
        first_unacked_seq: 1,
        next_seq: 1,
    })
}

pub fn record(seq: u64) -> Record {
    Record {
        seq,
        source: "mqtt".into(),
        device_id: format!("dev-{}", seq % 3),
        timestamp_ns: 1_700_000_000_000_000_000 + seq as i64 * 1_000_000,
        value: Some(record::Value::Signals(Signals {
            signals: vec![
                Signal::f64("temp", seq as f64 / 2.0),
                Signal::i64("n", seq as i64),
            ],
        })),
    }
}

pub fn batch(seqs: impl IntoIterator<Item = u64>) -> In {
    In::Batch(RecordBatch {
        records: seqs.into_iter().map(record).collect(),
        ..Default::default()
    })
}

/// Stats of the store after the server stopped (opens it directly).
pub fn store_stats(dir: &Path) -> Stats {
    use cloud_ingest::query::RecordSource;
    cloud_ingest::sink::EmbeddedStore::open_existing(dir)
        .unwrap()
        .stats()
        .unwrap()
}
