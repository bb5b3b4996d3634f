//! Prometheus metrics (prometheus-client), served as text on `/metrics`.
//! Counter names get their `_total` suffix from the encoder.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub reason: String,
}

/// Why a connection or stream was turned away; the `reason` label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    // TLS handshake.
    NoCertificate,
    UnknownCa,
    ExpiredCertificate,
    CertificateNotYetValid,
    RevokedCertificate,
    BadCertificate,
    NoIdentity,
    NoAlpn,
    ClientAlert,
    TlsError,
    HandshakeTimeout,
    HandshakeEof,
    HandshakeOverload,
    // Stream.
    IdentityMismatch,
    BadAgentId,
    UnsupportedRevision,
    NoHello,
    HelloTimeout,
    MessageTooLarge,
    BadSequence,
    MalformedRecord,
    ProtocolViolation,
    IdleTimeout,
}

impl Reject {
    pub fn label(self) -> &'static str {
        match self {
            Reject::NoCertificate => "no_certificate",
            Reject::UnknownCa => "unknown_ca",
            Reject::ExpiredCertificate => "expired_certificate",
            Reject::CertificateNotYetValid => "certificate_not_yet_valid",
            Reject::RevokedCertificate => "revoked_certificate",
            Reject::BadCertificate => "bad_certificate",
            Reject::NoIdentity => "no_identity",
            Reject::NoAlpn => "no_alpn",
            Reject::ClientAlert => "client_alert",
            Reject::TlsError => "tls_error",
            Reject::HandshakeTimeout => "handshake_timeout",
            Reject::HandshakeEof => "handshake_eof",
            Reject::HandshakeOverload => "handshake_overload",
            Reject::IdentityMismatch => "identity_mismatch",
            Reject::BadAgentId => "bad_agent_id",
            Reject::UnsupportedRevision => "unsupported_revision",
            Reject::NoHello => "no_hello",
            Reject::HelloTimeout => "hello_timeout",
            Reject::MessageTooLarge => "message_too_large",
            Reject::BadSequence => "bad_sequence",
            Reject::MalformedRecord => "malformed_record",
            Reject::ProtocolViolation => "protocol_violation",
            Reject::IdleTimeout => "idle_timeout",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pub connected_agents: Gauge,
    pub records_stored: Counter,
    pub batches: Counter,
    pub batches_compressed: Counter,
    pub commit_seconds: Histogram,
    pub duplicates: Counter,
    pub rejects: Family<RejectLabels, Counter>,
    pub bytes_received: Counter,
    pub retention_deleted: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let connected_agents = Gauge::default();
        let records_stored = Counter::default();
        let batches = Counter::default();
        let batches_compressed = Counter::default();
        // 100 µs .. ~3.3 s: an fsync on a good disk to a very sick one.
        let commit_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let duplicates = Counter::default();
        let rejects = Family::<RejectLabels, Counter>::default();
        let bytes_received = Counter::default();
        let retention_deleted = Counter::default();
        registry.register(
            "ingest_connected_agents",
            "Agents with an active session (after Hello)",
            connected_agents.clone(),
        );
        registry.register(
            "ingest_records_stored",
            "Records durably stored (duplicates excluded)",
            records_stored.clone(),
        );
        registry.register(
            "ingest_batches",
            "Record batches committed and acknowledged",
            batches.clone(),
        );
        registry.register(
            "ingest_batches_compressed",
            "Record batches received with their records compressed by the agent (RecordBatch.records_zstd)",
            batches_compressed.clone(),
        );
        registry.register(
            "ingest_commit_seconds",
            "Duration of one group commit (write and fsync)",
            commit_seconds.clone(),
        );
        registry.register(
            "ingest_duplicates",
            "Records dropped because they were already stored",
            duplicates.clone(),
        );
        registry.register(
            "ingest_rejects",
            "Connections and streams turned away, by reason",
            rejects.clone(),
        );
        registry.register(
            "ingest_bytes_received",
            "Bytes received from agents after TLS (HTTP/2 frames, before gRPC decompression)",
            bytes_received.clone(),
        );
        registry.register(
            "ingest_retention_deleted_records",
            "Records deleted by the retention policy",
            retention_deleted.clone(),
        );
        Self {
            registry,
            connected_agents,
            records_stored,
            batches,
            batches_compressed,
            commit_seconds,
            duplicates,
            rejects,
            bytes_received,
            retention_deleted,
        }
    }

    pub fn reject(&self, reason: Reject) {
        self.rejects
            .get_or_create(&RejectLabels {
                reason: reason.label().to_string(),
            })
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
