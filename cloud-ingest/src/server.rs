//! Putting it together: listeners, the committer, the gRPC, health and
//! admin servers, retention, and the order of a graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use edgefleet_proto::encoded::telemetry_server::TelemetryServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::codec::CompressionEncoding;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState};
use crate::committer::Committer;
use crate::config::{IngestConfig, Retention, SinkConfig, TlsMode};
use crate::error::IngestError;
use crate::metrics::Metrics;
use crate::query::RecordSource;
use crate::session::{SessionSettings, Shared, TelemetryService};
use crate::sink::{EmbeddedStore, Sink};
use crate::tls;

/// Where the servers actually listen (useful with port 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundAddrs {
    pub grpc: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub health: Option<SocketAddr>,
}

/// A bound, not yet running ingest: [`Ingest::bind`], read
/// [`Ingest::local_addrs`], then [`Ingest::run`].
pub struct Ingest {
    config: IngestConfig,
    grpc: TcpListener,
    admin: Option<TcpListener>,
    health: Option<TcpListener>,
    tls: Option<Arc<rustls::ServerConfig>>,
    sink: Arc<dyn Sink>,
    embedded: Option<Arc<EmbeddedStore>>,
    metrics: Arc<Metrics>,
    addrs: BoundAddrs,
}

/// Binds and runs until `shutdown` is cancelled, then drains (see [`Ingest::run`]).
pub async fn serve(config: IngestConfig, shutdown: CancellationToken) -> Result<(), IngestError> {
    Ingest::bind(config).await?.run(shutdown).await
}

impl Ingest {
    /// Loads the TLS material, opens the sink and binds every listener, so
    /// that configuration errors surface before anything is served.
    pub async fn bind(config: IngestConfig) -> Result<Self, IngestError> {
        if config.credit == 0 {
            return Err(IngestError::Config("credit must be at least 1".into()));
        }
        if config.max_message_bytes > u32::MAX as usize {
            return Err(IngestError::Config(
                "max_message_bytes must fit in 32 bits".into(),
            ));
        }
        if config.heartbeat_interval.is_zero() {
            return Err(IngestError::Config(
                "heartbeat_interval must be above zero".into(),
            ));
        }
        let tls = match &config.tls {
            TlsMode::Mtls {
                cert,
                key,
                client_ca,
            } => {
                let server = edgefleet_pki::server_tls_config(
                    edgefleet_pki::load::certs(cert)?,
                    edgefleet_pki::load::private_key(key)?,
                    edgefleet_pki::load::certs(client_ca)?,
                )?;
                Some(Arc::new(server))
            }
            TlsMode::InsecurePlaintextDevOnly => None,
        };
        let (sink, embedded): (Arc<dyn Sink>, Option<Arc<EmbeddedStore>>) = match &config.sink {
            SinkConfig::Embedded(embedded) => {
                let dir = embedded.dir.clone();
                let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(&dir))
                    .await
                    .map_err(|e| IngestError::Internal(format!("opening the store: {e}")))??;
                let store = Arc::new(store);
                (store.clone(), Some(store))
            }
            SinkConfig::Discard => (Arc::new(crate::sink::DiscardSink::default()), None),
        };
        let grpc = bind(config.listen, "--listen").await?;
        let admin = match config.metrics_listen {
            Some(addr) => Some(bind(addr, "--metrics-listen").await?),
            None => None,
        };
        let health = match config.health_listen {
            Some(addr) => Some(bind(addr, "--health-listen").await?),
            None => None,
        };
        let addrs = BoundAddrs {
            grpc: local_addr(&grpc, config.listen)?,
            metrics: admin
                .as_ref()
                .zip(config.metrics_listen)
                .map(|(l, a)| local_addr(l, a))
                .transpose()?,
            health: health
                .as_ref()
                .zip(config.health_listen)
                .map(|(l, a)| local_addr(l, a))
                .transpose()?,
        };
        Ok(Self {
            config,
            grpc,
            admin,
            health,
            tls,
            sink,
            embedded,
            metrics: Arc::new(Metrics::new()),
            addrs,
        })
    }

    pub fn local_addrs(&self) -> BoundAddrs {
        self.addrs
    }

    /// The live metrics (the same ones `/metrics` serves).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Serves until `shutdown` is cancelled, then drains: health turns
    /// NOT_SERVING and `/readyz` 503, the listener closes, every stream
    /// commits and acknowledges the batches it has received, sends `GoAway`
    /// and ends; then the committer finishes and the store is flushed.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), IngestError> {
        let Ingest {
            config,
            grpc,
            admin,
            health,
            tls,
            sink,
            embedded,
            metrics,
            addrs,
        } = self;
        if tls.is_none() {
            warn!("!!! --insecure-plaintext-dev-only: NO TLS, NO CLIENT AUTHENTICATION. Any client can claim to be any agent. Never use this outside a developer's machine. !!!");
        }
        // Stops the admin and health servers and retention, after the drain.
        let stopped = CancellationToken::new();
        let (committer, committer_thread) =
            Committer::start(sink.clone(), metrics.clone()).map_err(IngestError::Thread)?;
        let tasks = TaskTracker::new();
        let settings = SessionSettings {
            credit: config.credit,
            max_message_bytes: config.max_message_bytes,
            heartbeat_interval: config.heartbeat_interval,
            idle_timeout: config.idle_timeout(),
            hello_timeout: config.hello_timeout,
            goaway_retry_after: config.goaway_retry_after,
            trust_hello: tls.is_none(),
        };
        let shared = Arc::new(Shared::new(
            settings,
            sink,
            committer.clone(),
            metrics.clone(),
            config.byte_budget,
            shutdown.clone(),
            tasks.clone(),
        ));

        let (reporter, health_service) = tonic_health::server::health_reporter();
        reporter
            .set_serving::<TelemetryServer<TelemetryService>>()
            .await;
        let telemetry = TelemetryServer::new(TelemetryService::new(shared.clone()))
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Zstd)
            .send_compressed(CompressionEncoding::Zstd)
            .send_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(config.max_message_bytes);
        let incoming = tls::accept(
            grpc,
            tls,
            config.handshake_timeout,
            metrics.clone(),
            shutdown.clone(),
        );
        let mut grpc_task: JoinHandle<Result<(), tonic::transport::Error>> = tokio::spawn(
            Server::builder()
                .http2_keepalive_interval(Some(config.http2_keepalive_interval))
                .http2_keepalive_timeout(Some(config.http2_keepalive_timeout))
                .add_service(health_service.clone())
                .add_service(telemetry)
                .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned()),
        );

        let health_task = health.map(|listener| {
            tokio::spawn(
                Server::builder()
                    .add_service(health_service)
                    .serve_with_incoming_shutdown(
                        TcpListenerStream::new(listener),
                        stopped.clone().cancelled_owned(),
                    ),
            )
        });
        let records = embedded.clone().map(|s| s as Arc<dyn RecordSource>);
        let admin_task = admin.map(|listener| {
            let state = AdminState {
                metrics: metrics.clone(),
                draining: shutdown.clone(),
                records,
            };
            tokio::spawn(admin::serve(listener, state, stopped.clone()))
        });
        let retention_task = embedded.as_ref().and_then(|store| {
            let SinkConfig::Embedded(c) = &config.sink else {
                return None;
            };
            let active = c.retention.max_age.is_some() || c.retention.max_bytes.is_some();
            active.then(|| {
                tokio::spawn(retention_loop(
                    store.clone(),
                    c.retention.clone(),
                    metrics.clone(),
                    stopped.clone(),
                ))
            })
        });
        if let Some(store) = &embedded {
            let url = addrs.metrics.map(|a| format!("http://{}", advertised(a)));
            store.advertise_admin_url(url.as_deref());
        }
        let or_off = |a: Option<SocketAddr>| a.map_or_else(|| "off".to_string(), |a| a.to_string());
        info!(
            grpc = %addrs.grpc,
            metrics = %or_off(addrs.metrics),
            health = %or_off(addrs.health),
            mtls = matches!(config.tls, TlsMode::Mtls { .. }),
            "cloud-ingest listening"
        );

        let mut result = Ok(());
        let mut grpc_done = false;
        tokio::select! {
            _ = shutdown.cancelled() => {}
            ended = &mut grpc_task => {
                // Only a failure ends the server before shutdown is asked for.
                result = flatten(ended);
                grpc_done = true;
                shutdown.cancel();
            }
        }
        info!("draining: no new connections; finishing every received batch");
        reporter
            .set_not_serving::<TelemetryServer<TelemetryService>>()
            .await;
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;

        let drain_timeout = config.drain_timeout;
        if !grpc_done {
            match tokio::time::timeout(drain_timeout, &mut grpc_task).await {
                Ok(ended) => result = flatten(ended),
                Err(_) => {
                    warn!("connections still open after {drain_timeout:?}; closing them");
                    grpc_task.abort();
                }
            }
        }
        tasks.close();
        if tokio::time::timeout(drain_timeout, tasks.wait())
            .await
            .is_err()
        {
            warn!("streams still finishing after {drain_timeout:?}; not waiting for them");
        }
        // Everything received has been queued by now; the committer commits
        // it all before it stops.
        committer.stop();
        drop(shared);
        drop(committer);
        let _ = tokio::task::spawn_blocking(move || committer_thread.join()).await;

        stopped.cancel();
        // These end promptly unless a client holds a long request open (a
        // health Watch, a big /query); such a client is cut off.
        finish_task("health server", health_task).await;
        finish_task("admin server", admin_task).await;
        finish_task("retention", retention_task).await;
        if let Some(store) = embedded {
            store.advertise_admin_url(None);
            let flushed = tokio::task::spawn_blocking(move || store.flush()).await;
            if let Ok(Err(e)) = flushed {
                error!(error = %e, "final flush");
            }
        }
        info!("cloud-ingest stopped");
        result
    }
}

async fn finish_task<T, E: std::fmt::Display>(what: &str, task: Option<JoinHandle<Result<T, E>>>) {
    let Some(mut task) = task else { return };
    match tokio::time::timeout(Duration::from_secs(5), &mut task).await {
        Ok(Ok(Err(e))) => warn!(error = %e, "{what} failed"),
        Ok(_) => {}
        Err(_) => {
            warn!("{what} did not stop within 5 s; stopping it");
            task.abort();
        }
    }
}

fn flatten(
    ended: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> Result<(), IngestError> {
    match ended {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(IngestError::Server {
            what: "agents",
            source,
        }),
        Err(e) => Err(IngestError::Internal(format!(
            "the gRPC server task failed: {e}"
        ))),
    }
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, IngestError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| IngestError::Bind { addr, what, source })
}

fn local_addr(listener: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, IngestError> {
    listener.local_addr().map_err(|source| IngestError::Bind {
        addr,
        what: "local address",
        source,
    })
}

/// A wildcard bind is reachable on loopback from the same host.
fn advertised(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        other => other,
    }
}

async fn retention_loop(
    store: Arc<EmbeddedStore>,
    retention: Retention,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> Result<(), std::convert::Infallible> {
    let mut tick = tokio::time::interval(retention.interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let store = store.clone();
        let retention = retention.clone();
        let pass = tokio::task::spawn_blocking(move || {
            store.enforce_retention(&retention, SystemTime::now())
        })
        .await;
        match pass {
            Ok(Ok(report)) if report.deleted_records > 0 => {
                metrics.retention_deleted.inc_by(report.deleted_records);
                info!(
                    records = report.deleted_records,
                    bytes = report.deleted_bytes,
                    "retention deleted the oldest records"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => error!(error = %e, "retention pass failed"),
            Err(e) => error!(error = %e, "retention pass panicked"),
        }
    }
}
