//! The agent on Kubernetes: `edge-agent run --pipeline NAME` takes its
//! configuration from an `EdgePipeline` custom resource and reports into its
//! status (feature `kubernetes`).
//!
//! Three tasks, none of them on the data path:
//! * **follow** watches the one `EdgePipeline` (kube-runtime's watcher with a
//!   `metadata.name` field selector, which is what RBAC `resourceNames`
//!   admits) and validates each new generation exactly as a configuration
//!   file is validated, on this node (so a certificate or DBC file missing
//!   from the node's mounts refuses the spec). A valid spec goes to the
//!   supervisor, which restarts sources and uplink and keeps the buffer; an
//!   invalid one is refused and the running configuration stays.
//! * **report** writes this node's entry of `status.nodes` and the site
//!   summary (server-side apply, field manager `edge-agent@<node>`; see
//!   `edgefleet_fleet::EdgePipelineStatus` for why that never clobbers
//!   another node) every `status_interval`, and within a second when
//!   something a person cares about changes.
//! * the supervisor itself ([`Agent::run_on_node`]).
//!
//! The API server being unreachable only delays the first two: telemetry
//! keeps flowing with the configuration last applied, `/readyz` does not
//! look at the API server, and with a cache file the agent even starts
//! without it.

mod cache;
mod report;
mod spec;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgefleet_config::AgentConfig;
use edgefleet_fleet::{Backlog, EdgePipeline, NodeStatus};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use tokio::sync::{oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::supervisor::{AgentError, AgentHandle};
use crate::{Agent, ConfigFeed};
pub use report::{Observation, Refusal, SourceObservation, Thresholds};

/// How the agent finds and follows its pipeline.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// `metadata.name` of the `EdgePipeline`.
    pub name: String,
    /// Its namespace; `None`: the client configuration's (in a pod, the pod's).
    pub namespace: Option<String>,
    /// The Kubernetes node this agent runs on: keys its `status.nodes` entry
    /// and makes its MQTT client ids unique.
    pub node: String,
    /// Status written at least this often.
    pub status_interval: Duration,
    /// Where to keep the last applied configuration, to start from when the
    /// API server cannot be reached.
    pub cache_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("no Kubernetes client configuration (in-cluster service account, KUBECONFIG or ~/.kube/config): {0}")]
    ClientConfig(#[source] kube::config::InferConfigError),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("invalid {what} `{value}`: {reason}")]
    InvalidOption {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error(transparent)]
    Agent(#[from] AgentError),
}

#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error("the API server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the EdgePipeline does not exist")]
    Missing,
}

/// Every API call of the status writer gives up after this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Generations remembered to tell which one the running configuration is.
const SENT_KEPT: usize = 8;

/// A generation handed to the supervisor.
struct Sent {
    generation: i64,
    hash: String,
    config: Arc<AgentConfig>,
}

#[derive(Default)]
struct State {
    /// The object as last seen (watch event or status write).
    latest: Option<DynamicObject>,
    /// uid and generation of the spec last validated.
    handled: Option<(Option<String>, i64)>,
    sent: Vec<Sent>,
    refused: Option<Refusal>,
    agent: Option<AgentHandle>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Something worth a status write happened.
    changed: Notify,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("not poisoned")
    }
}

/// Kubernetes names: DNS-1123 subdomains (pipelines, nodes) and labels (namespaces).
fn check_name(what: &'static str, value: &str, max: usize) -> Result<(), PipelineError> {
    let invalid = |reason| PipelineError::InvalidOption {
        what,
        value: value.into(),
        reason,
    };
    if value.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if value.len() > max {
        return Err(invalid("too long for a Kubernetes name"));
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    if !value.chars().all(ok_char)
        || !value.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !value.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err(invalid(
            "a Kubernetes name has lowercase letters, digits, '-' and '.', and starts and ends with a letter or digit",
        ));
    }
    Ok(())
}

/// Where configurations go: to the running supervisor, or, before the first
/// valid one, to whoever starts it.
enum ConfigSink {
    Running(watch::Sender<AgentConfig>),
    First(Option<oneshot::Sender<watch::Receiver<AgentConfig>>>),
}

impl ConfigSink {
    fn send(&mut self, config: AgentConfig) {
        match self {
            ConfigSink::Running(tx) => {
                let _ = tx.send(config);
            }
            ConfigSink::First(slot) => {
                let (tx, rx) = watch::channel(config);
                if let Some(first) = slot.take() {
                    let _ = first.send(rx);
                }
                *self = ConfigSink::Running(tx);
            }
        }
    }
}

/// Runs the agent from the pipeline until `shutdown`.
pub async fn run(
    options: PipelineOptions,
    shutdown: CancellationToken,
) -> Result<(), PipelineError> {
    check_name("pipeline name", &options.name, 253)?;
    check_name("node name", &options.node, 253)?;
    let client_config = kube::Config::infer()
        .await
        .map_err(PipelineError::ClientConfig)?;
    let namespace = options
        .namespace
        .clone()
        .unwrap_or_else(|| client_config.default_namespace.clone());
    check_name("namespace", &namespace, 63)?;
    let client = kube::Client::try_from(client_config).map_err(PipelineError::Client)?;
    let api: Api<DynamicObject> =
        Api::namespaced_with(client, &namespace, &ApiResource::erase::<EdgePipeline>(&()));
    let target = Target {
        name: options.name.clone(),
        namespace,
        node: options.node.clone(),
        cache_file: options.cache_file.clone(),
    };
    tracing::info!(pipeline = %target.name, namespace = %target.namespace, node = %target.node, "following the EdgePipeline");

    let shared = Arc::new(Shared::default());
    // Stopped after the supervisor, so the last status says so.
    let background = CancellationToken::new();
    let cached = target.cache_file.as_deref().and_then(|path| {
        match cache::load(path, &target.namespace, &target.name) {
            Ok(cached) => {
                tracing::info!(cache = %path.display(), generation = cached.0, "starting with the cached configuration; the cluster's follows when it answers");
                Some(cached)
            }
            Err(why) => {
                if path.exists() {
                    tracing::warn!(cache = %path.display(), %why, "cached configuration not used");
                }
                None
            }
        }
    });
    let (sink, first, pending) = match cached {
        Some((generation, config)) => {
            shared.state().sent.push(Sent {
                generation,
                hash: config.hash(),
                config: Arc::new(config.clone()),
            });
            let (tx, rx) = watch::channel(config);
            (ConfigSink::Running(tx), Some(rx), None)
        }
        None => {
            let (tx, rx) = oneshot::channel();
            (ConfigSink::First(Some(tx)), None, Some(rx))
        }
    };
    let follower = tokio::spawn(follow(
        api.clone(),
        shared.clone(),
        target.clone(),
        sink,
        background.clone(),
    ));
    let reporter = tokio::spawn(report_loop(
        api,
        shared.clone(),
        target.clone(),
        options.status_interval,
        background.clone(),
    ));

    let rx = match (first, pending) {
        (Some(rx), _) => Some(rx),
        (None, Some(pending)) => {
            tracing::info!("waiting for a valid spec from the API server");
            tokio::select! {
                _ = shutdown.cancelled() => None,
                rx = pending => rx.ok(),
            }
        }
        (None, None) => None,
    };
    let result = match rx {
        Some(rx) => {
            let (ready_tx, ready_rx) = oneshot::channel();
            let on_ready = {
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Ok(handle) = ready_rx.await {
                        shared.state().agent = Some(handle);
                        shared.changed.notify_one();
                    }
                })
            };
            let result = Agent::run_on_node(
                ConfigFeed::Channel(rx),
                Some(target.node.clone()),
                shutdown.clone(),
                Some(ready_tx),
            )
            .await;
            on_ready.abort();
            result.map_err(PipelineError::from)
        }
        None => Ok(()),
    };
    background.cancel();
    let _ = follower.await;
    let _ = reporter.await;
    result
}

#[derive(Clone)]
struct Target {
    name: String,
    namespace: String,
    node: String,
    cache_file: Option<PathBuf>,
}

/// Watches the pipeline and hands every new valid generation to the supervisor.
async fn follow(
    api: Api<DynamicObject>,
    shared: Arc<Shared>,
    target: Target,
    mut sink: ConfigSink,
    stop: CancellationToken,
) {
    let config = watcher::Config::default().fields(&format!("metadata.name={}", target.name));
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    let mut failing = false;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = events.next() => event,
        };
        match event {
            None => return,
            Some(Err(e)) => {
                // The watcher retries with backoff (up to 30 s) on its own.
                tracing::warn!(error = %e, "cannot watch the EdgePipeline; the running configuration stays");
                failing = true;
            }
            Some(Ok(Event::Apply(object) | Event::InitApply(object))) => {
                if std::mem::take(&mut failing) {
                    tracing::info!("watching the EdgePipeline again");
                }
                on_object(&shared, &target, &mut sink, object).await;
            }
            Some(Ok(Event::Delete(_))) => {
                tracing::warn!("the EdgePipeline was deleted; the running configuration stays until one is created again");
                shared.state().latest = None;
            }
            Some(Ok(Event::Init | Event::InitDone)) => {}
        }
    }
}

async fn on_object(shared: &Shared, target: &Target, sink: &mut ConfigSink, object: DynamicObject) {
    let generation = object.metadata.generation.unwrap_or(0);
    let key = (object.metadata.uid.clone(), generation);
    let spec = object.data.get("spec").cloned();
    {
        let mut state = shared.state();
        state.latest = Some(object);
        // Status writes (ours and other nodes') change the object too.
        if state.handled.as_ref() == Some(&key) {
            return;
        }
        state.handled = Some(key);
    }
    let origin = format!(
        "EdgePipeline {}/{} generation {generation}",
        target.namespace, target.name
    );
    match spec::config_from_spec(spec.as_ref(), &origin) {
        Ok(config) => {
            let hash = config.hash();
            let config = Arc::new(config);
            let unchanged = {
                let mut state = shared.state();
                state.refused = None;
                let unchanged = state.sent.last().is_some_and(|s| s.hash == hash);
                state.sent.push(Sent {
                    generation,
                    hash: hash.clone(),
                    config: config.clone(),
                });
                if state.sent.len() > SENT_KEPT {
                    state.sent.remove(0);
                }
                unchanged
            };
            if unchanged {
                tracing::info!(generation, config_hash = %hash, "spec accepted; the configuration it describes already runs");
            } else {
                tracing::info!(generation, config_hash = %hash, "spec accepted; applying it");
                sink.send((*config).clone());
            }
            if let Some(path) = target.cache_file.clone() {
                let (namespace, name) = (target.namespace.clone(), target.name.clone());
                let saved = tokio::task::spawn_blocking(move || {
                    cache::save(&path, &namespace, &name, generation, &config)
                        .map_err(|e| format!("{}: {e}", path.display()))
                })
                .await;
                if let Ok(Err(e)) = saved {
                    tracing::warn!(error = %e, "cannot cache the configuration");
                }
            }
        }
        Err(message) => {
            tracing::error!(generation, problems = %message, "spec refused; the running configuration stays");
            let mut state = shared.state();
            if let Some(agent) = &state.agent {
                agent.metrics.config_reload("rejected");
            }
            state.refused = Some(Refusal {
                generation,
                message,
            });
        }
    }
    shared.changed.notify_one();
}

/// How long problems have lasted, from one sample to the next.
#[derive(Default)]
struct Tracker {
    uplink_down_since: Option<Timestamp>,
    source_down_since: HashMap<String, Timestamp>,
}

fn observe(shared: &Shared, node: &str, tracker: &mut Tracker) -> Observation {
    let now = Timestamp::now();
    let state = shared.state();
    let sent: Vec<(i64, String)> = state
        .sent
        .iter()
        .map(|s| (s.generation, s.hash.clone()))
        .collect();
    let mut o = Observation {
        node: node.into(),
        now,
        running: false,
        running_hash: String::new(),
        sent,
        refused: state.refused.clone(),
        backlog: Backlog::default(),
        buffer_max_bytes: 0,
        last_acked: None,
        sources: Vec::new(),
        uplink_down_since: None,
    };
    let Some(agent) = &state.agent else {
        return o;
    };
    let metrics = &agent.metrics;
    o.running = metrics.is_ready();
    o.running_hash = metrics.running_config();
    let stats = agent.buffer.stats();
    o.backlog = Backlog {
        records: stats.records,
        bytes: stats.bytes,
    };
    o.last_acked = metrics
        .last_acked_ns()
        .and_then(|ns| Timestamp::from_nanosecond(ns as i128).ok());
    tracker.uplink_down_since = if metrics.uplink_is_connected() {
        None
    } else {
        Some(tracker.uplink_down_since.unwrap_or(now))
    };
    o.uplink_down_since = tracker.uplink_down_since;
    let running = state
        .sent
        .iter()
        .rev()
        .find(|s| s.hash == o.running_hash)
        .map(|s| s.config.clone());
    if let Some(config) = running {
        o.buffer_max_bytes = config.buffer.max_bytes.0;
        let names: Vec<String> = crate::sources::from_config(&config)
            .iter()
            .map(|s| s.name().to_string())
            .collect();
        tracker
            .source_down_since
            .retain(|name, _| names.contains(name));
        for name in names {
            let up = metrics.source_is_up(&name);
            let down_since = if up {
                tracker.source_down_since.remove(&name);
                None
            } else {
                Some(*tracker.source_down_since.entry(name.clone()).or_insert(now))
            };
            o.sources.push(SourceObservation {
                failure: metrics.source_failure(&name),
                name,
                up,
                down_since,
            });
        }
    }
    o
}

/// The parts of an entry that call for a write as soon as they change
/// (not the backlog, which changes all the time).
fn fingerprint(status: &NodeStatus) -> NodeStatus {
    NodeStatus {
        backlog: Backlog::default(),
        last_acked_time: None,
        heartbeat_time: Time(Timestamp::UNIX_EPOCH),
        ..status.clone()
    }
}

/// Writes this node's status: at least every `interval`, within a second of
/// a change, with backoff while the API server fails, and once more when
/// stopping.
async fn report_loop(
    api: Api<DynamicObject>,
    shared: Arc<Shared>,
    target: Target,
    interval: Duration,
    stop: CancellationToken,
) {
    let manager: String = format!("edge-agent@{}", target.node)
        .chars()
        .take(128)
        .collect();
    // Entries not refreshed for this long (a node gone) leave the summary.
    let stale_after = (interval * 4).max(Duration::from_secs(120));
    let limits = Thresholds::default();
    let mut tracker = Tracker::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut written: Option<(NodeStatus, Instant)> = None;
    // The last entry computed while running: the final one reports from it.
    let mut last: Option<NodeStatus> = None;
    let mut failures: u32 = 0;
    let mut next_attempt = Instant::now();
    loop {
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tick.tick() => false,
            _ = shared.changed.notified() => false,
        };
        if stopping {
            // The supervisor has stopped: say so, keeping what ran last.
            let Some(mut mine) = last else { return };
            mine.ready = false;
            mine.message = Some("agent stopped".into());
            mine.heartbeat_time = Time(Timestamp::now());
            if let Err(e) = write(&api, &shared, &target, &manager, &mine, stale_after).await {
                tracing::debug!(error = %e, "last status not written");
            }
            return;
        }
        let observation = observe(&shared, &target.node, &mut tracker);
        let mine = report::node_status(&observation, &limits);
        last = Some(mine.clone());
        let due = match &written {
            None => true,
            Some((last, at)) => *last != fingerprint(&mine) || at.elapsed() >= interval,
        };
        if !due || Instant::now() < next_attempt {
            continue;
        }
        match write(&api, &shared, &target, &manager, &mine, stale_after).await {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!("status written again");
                }
                failures = 0;
                written = Some((fingerprint(&mine), Instant::now()));
            }
            Err(e) => {
                failures += 1;
                // Only the first failure of a run is a warning: an offline
                // site would otherwise fill the log.
                if failures == 1 {
                    tracing::warn!(error = %e, "cannot write the EdgePipeline status; telemetry is unaffected, retrying");
                } else {
                    tracing::debug!(error = %e, failures, "cannot write the EdgePipeline status");
                }
                let backoff = Duration::from_secs(1 << failures.min(5)).min(interval);
                next_attempt = Instant::now() + backoff;
            }
        }
    }
}

async fn call<T>(
    future: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, WriteError> {
    match tokio::time::timeout(CALL_TIMEOUT, future).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(WriteError::Timeout(CALL_TIMEOUT)),
    }
}

/// One status write: server-side apply with the last read object's
/// resourceVersion as precondition; on a conflict (another node wrote), read
/// again and recompute the summary. The last attempt goes without the
/// precondition: this node's entry is safe either way, only the summary may
/// then lag one write behind.
async fn write(
    api: &Api<DynamicObject>,
    shared: &Shared,
    target: &Target,
    manager: &str,
    mine: &NodeStatus,
    stale_after: Duration,
) -> Result<(), WriteError> {
    const ATTEMPTS: usize = 3;
    let params = PatchParams::apply(manager).force();
    let mut object = shared.state().latest.clone();
    for attempt in 1..=ATTEMPTS {
        let read = match object.take() {
            Some(object) => object,
            None => call(api.get_opt(&target.name))
                .await?
                .ok_or(WriteError::Missing)?,
        };
        let body = report::apply_body(&read, mine, stale_after, attempt < ATTEMPTS);
        match call(api.patch_status(&target.name, &params, &Patch::Apply(&body))).await {
            Ok(updated) => {
                shared.state().latest = Some(updated);
                return Ok(());
            }
            Err(WriteError::Api(kube::Error::Api(status)))
                if status.code == 409 && attempt < ATTEMPTS =>
            {
                tracing::debug!(
                    attempt,
                    "the EdgePipeline changed since it was read; reading it again"
                );
            }
            Err(e) => return Err(e),
        }
    }
    unreachable!("the last attempt returns")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_call() {
        assert!(check_name("node name", "gw-1.site", 253).is_ok());
        for bad in ["", "GW", "-a", "a-", "a_b"] {
            let e = check_name("node name", bad, 253).unwrap_err().to_string();
            assert!(e.starts_with(&format!("invalid node name `{bad}`")), "{e}");
        }
        assert!(check_name("namespace", &"a".repeat(64), 63).is_err());
    }
}
