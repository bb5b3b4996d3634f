//! Prometheus metrics and the health endpoints (`/metrics`, `/healthz`,
//! `/readyz`, `/status`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use edgefleet_buffer::{BufferStats, CommitObserver};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FormLabel {
    form: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HashLabel {
    hash: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CanLabel {
    source: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CanErrorLabel {
    source: String,
    class: String,
}

/// The agent's metrics. Buffer levels are copied in by [`Metrics::observe_buffer`].
pub struct Metrics {
    registry: Registry,
    records_in: Family<SourceLabel, Counter>,
    decode_errors: Family<SourceLabel, Counter>,
    source_reconnects: Family<SourceLabel, Counter>,
    source_up: Family<SourceLabel, Gauge>,
    source_queued: Family<SourceLabel, Gauge>,
    dropped: Family<ReasonLabel, Counter>,
    records_acked: Counter,
    records_sent: Family<FormLabel, Counter>,
    uplink_reconnects: Counter,
    uplink_connected: Gauge,
    acked_seq: Gauge,
    buffer_bytes: Gauge,
    buffer_records: Gauge,
    buffer_commit_seconds: Histogram,
    buffer_quarantined: Counter,
    buffer_write_errors: Gauge,
    redeliveries_deduplicated: Gauge,
    config_reloads: Family<ReasonLabel, Counter>,
    config_info: Family<HashLabel, Gauge>,
    can_frames: Family<CanLabel, Counter>,
    can_error_frames: Family<CanErrorLabel, Counter>,
    last_dropped_full: AtomicU64,
    ready: AtomicBool,
    status: Mutex<serde_json::Value>,
    /// Wall-clock time (Unix ns) of the last ack that covered records; 0: none yet.
    last_acked_ns: AtomicI64,
    /// Sources that stopped with an error, and why (until the next configuration).
    source_failures: Mutex<BTreeMap<String, String>>,
    /// Hash of the configuration sources and uplink run with.
    running_config: Mutex<String>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("edge"),
            records_in: Family::default(),
            decode_errors: Family::default(),
            source_reconnects: Family::default(),
            source_up: Family::default(),
            source_queued: Family::default(),
            dropped: Family::default(),
            records_acked: Counter::default(),
            records_sent: Family::default(),
            uplink_reconnects: Counter::default(),
            uplink_connected: Gauge::default(),
            acked_seq: Gauge::default(),
            buffer_bytes: Gauge::default(),
            buffer_records: Gauge::default(),
            // 100 µs .. ~3.3 s, as the ingest's `ingest_commit_seconds`.
            buffer_commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            buffer_quarantined: Counter::default(),
            buffer_write_errors: Gauge::default(),
            redeliveries_deduplicated: Gauge::default(),
            config_reloads: Family::default(),
            config_info: Family::default(),
            can_frames: Family::default(),
            can_error_frames: Family::default(),
            last_dropped_full: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            status: Mutex::new(serde_json::Value::Null),
            last_acked_ns: AtomicI64::new(0),
            source_failures: Mutex::new(BTreeMap::new()),
            running_config: Mutex::new(String::new()),
        };
        let r = &mut m.registry;
        r.register(
            "records_in",
            "Records buffered, by source",
            m.records_in.clone(),
        );
        r.register(
            "decode_errors",
            "Payloads that did not decode, by source",
            m.decode_errors.clone(),
        );
        r.register(
            "source_reconnects",
            "Source connection failures, by source",
            m.source_reconnects.clone(),
        );
        r.register(
            "source_up",
            "1 while the source is connected",
            m.source_up.clone(),
        );
        r.register(
            "source_queued_messages",
            "Messages a source has received and not yet handed to the buffer (bounded: at its bound the source stops reading)",
            m.source_queued.clone(),
        );
        r.register(
            "dropped_records",
            "Records dropped, by reason",
            m.dropped.clone(),
        );
        r.register(
            "records_out",
            "Records acknowledged by the ingest",
            m.records_acked.clone(),
        );
        r.register(
            "uplink_records_sent",
            "Records sent to the ingest (resends included), by the form they went in: stored_frame (the buffer's compressed segment as it is on disk), compressed (compressed on the way) or plain",
            m.records_sent.clone(),
        );
        r.register(
            "uplink_reconnects",
            "Uplink sessions that failed",
            m.uplink_reconnects.clone(),
        );
        r.register(
            "uplink_connected",
            "1 while a session with the ingest is up",
            m.uplink_connected.clone(),
        );
        r.register(
            "acked_seq",
            "Highest sequence number the ingest acknowledged",
            m.acked_seq.clone(),
        );
        r.register(
            "buffer_bytes",
            "Bytes the buffer stores (compressed), what its maxBytes caps",
            m.buffer_bytes.clone(),
        );
        r.register(
            "buffer_records",
            "Records in the buffer",
            m.buffer_records.clone(),
        );
        r.register(
            "buffer_commit_seconds",
            "Duration of one group commit of the buffer that wrote to disk (write and fsync)",
            m.buffer_commit_seconds.clone(),
        );
        r.register(
            "buffer_quarantined",
            "Corrupt buffers moved aside",
            m.buffer_quarantined.clone(),
        );
        r.register(
            "buffer_write_errors",
            "Failed buffer writes since start",
            m.buffer_write_errors.clone(),
        );
        r.register(
            "redeliveries_deduplicated",
            "Source redeliveries recognised and not stored twice",
            m.redeliveries_deduplicated.clone(),
        );
        r.register(
            "config_reloads",
            "Configuration reloads, by result",
            m.config_reloads.clone(),
        );
        r.register(
            "config_info",
            "1 for the hash of the configuration the agent runs",
            m.config_info.clone(),
        );
        r.register("can_frames", "CAN frames received, by source and kind (decoded, reduced_away, unknown, short, remote)", m.can_frames.clone());
        r.register(
            "can_error_frames",
            "CAN error frames, by source and error class",
            m.can_error_frames.clone(),
        );
        m
    }

    pub fn records_in(&self, source: &str, n: u64) {
        self.records_in
            .get_or_create(&SourceLabel {
                source: source.into(),
            })
            .inc_by(n);
    }
    pub fn decode_error(&self, source: &str) {
        self.decode_errors
            .get_or_create(&SourceLabel {
                source: source.into(),
            })
            .inc();
    }
    pub fn source_reconnect(&self, source: &str) {
        self.source_reconnects
            .get_or_create(&SourceLabel {
                source: source.into(),
            })
            .inc();
    }
    pub fn source_up(&self, source: &str, up: bool) {
        self.source_up
            .get_or_create(&SourceLabel {
                source: source.into(),
            })
            .set(up as i64);
    }
    /// The source's queue gauge, to set as often as its queue changes.
    pub fn source_queued(&self, source: &str) -> Gauge {
        self.source_queued
            .get_or_create(&SourceLabel {
                source: source.into(),
            })
            .clone()
    }
    /// Whether a source last reported itself up (MQTT: subscribed).
    pub fn source_is_up(&self, source: &str) -> bool {
        self.source_up
            .get_or_create(&SourceLabel {
                source: source.into(),
            })
            .get()
            == 1
    }
    pub fn dropped(&self, reason: &str, n: u64) {
        self.dropped
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc_by(n);
    }
    pub fn can_frames(&self, source: &str, kind: &str, n: u64) {
        self.can_frames
            .get_or_create(&CanLabel {
                source: source.into(),
                kind: kind.into(),
            })
            .inc_by(n);
    }
    pub fn can_error_frames(&self, source: &str, class: &str, n: u64) {
        self.can_error_frames
            .get_or_create(&CanErrorLabel {
                source: source.into(),
                class: class.into(),
            })
            .inc_by(n);
    }
    /// A batch sent: `framed` of its `records` went as the buffer's stored
    /// frames, the rest compressed on the way, or all of them plain.
    pub fn sent(&self, records: u64, framed: u64, plain: bool) {
        let add = |form, n| {
            if n > 0 {
                self.records_sent
                    .get_or_create(&FormLabel { form })
                    .inc_by(n);
            }
        };
        if plain {
            add("plain", records);
        } else {
            add("stored_frame", framed);
            add("compressed", records - framed);
        }
    }
    pub fn acked(&self, records: u64, through: u64) {
        self.records_acked.inc_by(records);
        self.acked_seq.set(through as i64);
        if records > 0 {
            self.last_acked_ns.store(crate::now_ns(), Ordering::Relaxed);
        }
    }
    /// When the ingest last acknowledged records (Unix ns), if it has since start.
    pub fn last_acked_ns(&self) -> Option<i64> {
        Some(self.last_acked_ns.load(Ordering::Relaxed)).filter(|ns| *ns > 0)
    }
    /// Whether a session with the ingest is up.
    pub fn uplink_is_connected(&self) -> bool {
        self.uplink_connected.get() == 1
    }
    /// Records that a source stopped with an error it will not recover from.
    pub fn source_failed(&self, source: &str, message: String) {
        self.source_failures
            .lock()
            .expect("not poisoned")
            .insert(source.into(), message);
    }
    /// Forgets source failures: a new configuration starts every source anew.
    pub fn clear_source_failures(&self) {
        self.source_failures.lock().expect("not poisoned").clear();
    }
    /// Why the source stopped, if it did.
    pub fn source_failure(&self, source: &str) -> Option<String> {
        self.source_failures
            .lock()
            .expect("not poisoned")
            .get(source)
            .cloned()
    }
    pub fn uplink_reconnect(&self) {
        self.uplink_reconnects.inc();
    }
    pub fn uplink_connected(&self, up: bool) {
        self.uplink_connected.set(up as i64);
    }
    pub fn buffer_quarantined(&self) {
        self.buffer_quarantined.inc();
    }
    pub fn config_reload(&self, result: &str) {
        self.config_reloads
            .get_or_create(&ReasonLabel {
                reason: result.into(),
            })
            .inc();
    }
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
    /// Records which configuration sources and uplink now run with.
    pub fn set_running_config(&self, hash: &str) {
        let mut running = self.running_config.lock().expect("not poisoned");
        if !running.is_empty() {
            self.config_info.remove(&HashLabel {
                hash: running.clone(),
            });
        }
        self.config_info
            .get_or_create(&HashLabel { hash: hash.into() })
            .set(1);
        *running = hash.into();
    }
    /// Hash of the configuration running now; empty before the first start.
    pub fn running_config(&self) -> String {
        self.running_config.lock().expect("not poisoned").clone()
    }
    /// What `/readyz` answers: a configuration is applied and running.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
    pub fn set_status(&self, status: serde_json::Value) {
        *self.status.lock().expect("not poisoned") = status;
    }
    pub fn status(&self) -> serde_json::Value {
        self.status.lock().expect("not poisoned").clone()
    }

    /// What the buffer calls after each group commit that wrote to disk.
    pub fn buffer_commit_observer(&self) -> CommitObserver {
        let histogram = self.buffer_commit_seconds.clone();
        CommitObserver(Arc::new(move |took| histogram.observe(took.as_secs_f64())))
    }

    /// Copies the buffer's levels and counters into the metrics.
    pub fn observe_buffer(&self, stats: &BufferStats) {
        self.buffer_bytes.set(stats.bytes as i64);
        self.buffer_records.set(stats.records as i64);
        self.buffer_write_errors
            .set(stats.write_errors_total as i64);
        self.redeliveries_deduplicated
            .set(stats.duplicates_total as i64);
        let before = self
            .last_dropped_full
            .swap(stats.dropped_full_total, Ordering::Relaxed);
        if stats.dropped_full_total > before {
            self.dropped("buffer_full", stats.dropped_full_total - before);
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Serves the endpoints until `shutdown`. Returns the bound address.
pub async fn serve(
    listen: &str,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get({
                let m = metrics.clone();
                move || async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get({
                let m = metrics.clone();
                move || async move {
                    if m.ready.load(Ordering::Relaxed) {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                    }
                }
            }),
        )
        .route(
            "/status",
            get({
                let m = metrics.clone();
                move || async move { axum::Json(m.status()) }
            }),
        );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    Ok(addr)
}
