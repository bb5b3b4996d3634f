//! Owns the buffer and runs sources and the uplink for the current
//! configuration. A new configuration restarts sources and uplink; the
//! buffer stays open throughout, so reconfiguration never loses data.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use edgefleet_buffer::{Buffer, BufferOptions, FullPolicy};
use edgefleet_config::AgentConfig;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::sources::{self, SourceContext};
use crate::uplink::Uplink;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] edgefleet_config::ConfigError),
    #[error("metrics endpoint on {listen}: {source}")]
    Metrics {
        listen: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where configurations come from.
pub enum ConfigFeed {
    /// A YAML file, re-read when it changes.
    File(PathBuf),
    /// Configurations pushed by the embedder (tests, the demo, a Kubernetes
    /// watcher). The first value is used at start.
    Channel(watch::Receiver<AgentConfig>),
}

/// Handles to a running agent, for embedders.
#[derive(Clone)]
pub struct AgentHandle {
    pub buffer: Buffer,
    pub metrics: Arc<Metrics>,
    pub metrics_addr: Option<std::net::SocketAddr>,
}

pub struct Agent;

impl Agent {
    /// Runs until `shutdown` is cancelled, then stops sources, lets the uplink
    /// finish in-flight batches and closes the buffer.
    pub async fn run(
        feed: ConfigFeed,
        shutdown: CancellationToken,
        on_ready: Option<oneshot::Sender<AgentHandle>>,
    ) -> Result<(), AgentError> {
        Self::run_on_node(feed, None, shutdown, on_ready).await
    }

    /// [`run`](Self::run) as the agent of Kubernetes node `node`, one of
    /// several sharing a configuration: sources run with
    /// [`AgentConfig::for_node`] (unique MQTT client ids).
    pub async fn run_on_node(
        feed: ConfigFeed,
        node: Option<String>,
        shutdown: CancellationToken,
        on_ready: Option<oneshot::Sender<AgentHandle>>,
    ) -> Result<(), AgentError> {
        let (mut config, mut updates) = match feed {
            ConfigFeed::File(path) => {
                let config = edgefleet_config::load_file(&path)?;
                let (tx, rx) = watch::channel(config.clone());
                tokio::spawn(watch_file(path, config.clone(), tx, shutdown.clone()));
                (config, rx)
            }
            ConfigFeed::Channel(rx) => {
                let config = rx.borrow().clone();
                (config, rx)
            }
        };
        updates.mark_unchanged();
        let metrics = Arc::new(Metrics::new());
        let metrics_addr = if config.metrics.listen.is_empty() {
            None
        } else {
            Some(
                crate::metrics::serve(&config.metrics.listen, metrics.clone(), shutdown.clone())
                    .await
                    .map_err(|source| AgentError::Metrics {
                        listen: config.metrics.listen.clone(),
                        source,
                    })?,
            )
        };
        let Some(buffer) = open_buffer(&config, &metrics, &shutdown).await else {
            return Ok(());
        };
        if let Some(tx) = on_ready {
            let _ = tx.send(AgentHandle {
                buffer: buffer.clone(),
                metrics: metrics.clone(),
                metrics_addr,
            });
        }
        let observer = tokio::spawn(observe(buffer.clone(), metrics.clone(), shutdown.clone()));

        loop {
            let generation = shutdown.child_token();
            let tasks = start(&config, node.as_deref(), &buffer, &metrics, &generation);
            metrics.set_running_config(&config.hash());
            metrics.set_ready(true);
            tracing::info!(config_hash = %config.hash(), sources = tasks.len() - 1, "agent running");
            let next = tokio::select! {
                _ = shutdown.cancelled() => None,
                changed = updates.changed() => match changed {
                    Ok(()) => Some(updates.borrow_and_update().clone()),
                    Err(_) => { shutdown.cancelled().await; None }
                },
            };
            generation.cancel();
            stop(tasks).await;
            let Some(new_config) = next else { break };
            if new_config.agent.data_dir != config.agent.data_dir {
                tracing::warn!("agent.dataDir changed: that takes effect only at the next start");
            }
            if let Err(e) = buffer
                .set_limits(new_config.buffer.max_bytes.0, policy(&new_config))
                .await
            {
                tracing::error!(error = %e, "cannot apply buffer limits");
            }
            tracing::info!(config_hash = %new_config.hash(), "configuration changed: restarting sources and uplink; the buffer stays");
            metrics.config_reload("applied");
            config = new_config;
        }
        metrics.set_ready(false);
        observer.abort();
        buffer.close().await.ok();
        tracing::info!("agent stopped; buffer flushed and closed");
        Ok(())
    }
}

fn policy(config: &AgentConfig) -> FullPolicy {
    match config.buffer.when_full {
        edgefleet_config::FullPolicy::Block => FullPolicy::Block,
        edgefleet_config::FullPolicy::DropOldest => FullPolicy::DropOldest,
    }
}

/// Opens the buffer, retrying on errors that are not corruption (a full or
/// read-only disk, a lock held by another agent) instead of exiting, so a
/// supervisor never sees a crash loop.
async fn open_buffer(
    config: &AgentConfig,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Option<Buffer> {
    let mut options = BufferOptions::new(&config.agent.data_dir);
    options.max_bytes = config.buffer.max_bytes.0;
    options.when_full = policy(config);
    options.flush_max_delay = Duration::from_millis(config.buffer.flush.max_delay_ms);
    options.flush_max_records = config.buffer.flush.max_batch_records as usize;
    options.dead_letter_max = config.buffer.dead_letter_max;
    options.on_commit = Some(metrics.buffer_commit_observer());
    loop {
        let attempt = {
            let options = options.clone();
            tokio::task::spawn_blocking(move || Buffer::open(options)).await
        };
        match attempt {
            Ok(Ok((buffer, report))) => {
                if let Some(q) = &report.quarantined {
                    metrics.buffer_quarantined();
                    tracing::error!(moved_to = %q.moved_to.display(), reason = %q.reason, "buffer was corrupt and has been quarantined");
                }
                tracing::info!(dir = %options.buffer_dir().display(), resumed_records = report.resumed_records, created = report.created, "buffer open");
                return Some(buffer);
            }
            Ok(Err(e)) => tracing::error!(error = %e, "cannot open the buffer; retrying in 5 s"),
            Err(e) => tracing::error!(error = %e, "buffer open task failed; retrying in 5 s"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

fn start(
    config: &AgentConfig,
    node: Option<&str>,
    buffer: &Buffer,
    metrics: &Arc<Metrics>,
    generation: &CancellationToken,
) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    metrics.clear_source_failures();
    let sources = match node {
        Some(node) => sources::from_config(&config.for_node(node)),
        None => sources::from_config(config),
    };
    for source in sources {
        let name = source.name().to_string();
        let ctx = SourceContext {
            buffer: buffer.clone(),
            metrics: metrics.clone(),
            shutdown: generation.clone(),
        };
        let metrics = metrics.clone();
        tasks.spawn(async move {
            if let Err(e) = source.run(ctx).await {
                tracing::error!(source = %name, error = %e, "source stopped");
                metrics.source_failed(&name, e.to_string());
            }
        });
    }
    let uplink = Uplink {
        config: config.uplink.clone(),
        buffer: buffer.clone(),
        metrics: metrics.clone(),
        config_hash: config.hash(),
        node: node.map_or_else(crate::host_name, str::to_string),
        expected_identity: config.agent.id.clone(),
    };
    let token = generation.clone();
    tasks.spawn(async move { uplink.run(token).await });
    tasks
}

async fn stop(mut tasks: JoinSet<()>) {
    let all = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(20), all)
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop in 20 s; abandoning them");
    }
}

/// Keeps metrics and `/status` current.
async fn observe(buffer: Buffer, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let stats = buffer.stats();
        metrics.observe_buffer(&stats);
        metrics.set_status(serde_json::json!({
            "buffer": {
                "records": stats.records,
                "bytes": stats.bytes,
                "first_seq": stats.first_seq,
                "next_seq": stats.next_seq,
                "durable_through": stats.durable_through,
                "acked_through": stats.acked_through,
                "anchored": stats.anchored,
                "dropped_full_total": stats.dropped_full_total,
                "redeliveries_deduplicated": stats.duplicates_total,
                "write_errors_total": stats.write_errors_total,
            }
        }));
    }
}

/// Polls the config file (a ConfigMap mount changes by symlink swap, which
/// inotify watchers often miss) and publishes valid new versions. An invalid
/// file is reported and ignored: the running configuration stays.
async fn watch_file(
    path: PathBuf,
    mut current: AgentConfig,
    tx: watch::Sender<AgentConfig>,
    shutdown: CancellationToken,
) {
    let mut last_text = std::fs::read_to_string(&path).unwrap_or_default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if text == last_text {
            continue;
        }
        last_text = text.clone();
        match edgefleet_config::parse_str(&text, &path.display().to_string()) {
            Ok(config) if config == current => {}
            Ok(config) => {
                current = config.clone();
                let _ = tx.send(config);
            }
            Err(e) => {
                tracing::error!(error = %e, "configuration change rejected; keeping the running configuration");
            }
        }
    }
}
