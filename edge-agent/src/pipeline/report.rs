//! What this agent writes into its `EdgePipeline`'s status: its own entry in
//! `status.nodes` and the site summary recomputed from every entry.
//!
//! Pure functions of an [`Observation`] and the object last read, so the
//! rules are tested without a cluster; `super::status` does the I/O.

use std::time::Duration;

use edgefleet_fleet::{Backlog, EdgePipelineStatus, NodeStatus, SourceState, SourceStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::DynamicObject;
use serde_json::{json, Value};

/// Status messages are for people and `kubectl get`: long lists of problems
/// are cut here.
const MAX_MESSAGE: usize = 2048;

/// A spec the agent refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub generation: i64,
    pub message: String,
}

/// One source as the agent sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceObservation {
    pub name: String,
    pub up: bool,
    /// Set when the source stopped with an error.
    pub failure: Option<String>,
    /// Since when it has not been up (while `up` is false).
    pub down_since: Option<Timestamp>,
}

/// A sample of the agent's state.
#[derive(Debug, Clone)]
pub struct Observation {
    pub node: String,
    pub now: Timestamp,
    /// Sources and uplink run (the supervisor started a configuration).
    pub running: bool,
    /// Hash of the configuration they run.
    pub running_hash: String,
    /// Generations handed to the supervisor with their configuration's hash,
    /// oldest first.
    pub sent: Vec<(i64, String)>,
    /// The newest generation, if it was refused.
    pub refused: Option<Refusal>,
    pub backlog: Backlog,
    pub buffer_max_bytes: u64,
    pub last_acked: Option<Timestamp>,
    pub sources: Vec<SourceObservation>,
    /// Since when no session with the ingest has been up, if none is.
    pub uplink_down_since: Option<Timestamp>,
}

/// How long a problem lasts before it degrades the pipeline.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub uplink_down: Duration,
    pub source_down: Duration,
    /// Buffer fill (0..=1) counted as full.
    pub buffer_full: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            uplink_down: Duration::from_secs(60),
            source_down: Duration::from_secs(120),
            buffer_full: 0.95,
        }
    }
}

impl Observation {
    /// The generation whose configuration runs now.
    pub fn running_generation(&self) -> Option<i64> {
        self.sent
            .iter()
            .rev()
            .find(|(_, hash)| *hash == self.running_hash)
            .map(|(generation, _)| *generation)
    }
}

fn longer_than(since: Option<Timestamp>, now: Timestamp, limit: Duration) -> bool {
    let limit = SignedDuration::try_from(limit).unwrap_or(SignedDuration::MAX);
    since.is_some_and(|since| now.duration_since(since) >= limit)
}

fn truncate(mut message: String) -> String {
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str(" ...");
    }
    message
}

/// This agent's entry in `status.nodes`.
pub fn node_status(o: &Observation, limits: &Thresholds) -> NodeStatus {
    let running_generation = o.running_generation().filter(|_| o.running);
    let newest_sent = o.sent.last().map(|(generation, _)| *generation);
    let observed = running_generation
        .into_iter()
        .chain(o.refused.as_ref().map(|r| r.generation))
        .max()
        .unwrap_or(0);

    let sources: Vec<SourceStatus> = o
        .sources
        .iter()
        .map(|s| {
            let (state, message) = match (&s.failure, s.up) {
                (Some(failure), _) => (SourceState::Failed, Some(failure.clone())),
                (None, true) => (SourceState::Running, None),
                (None, false) => (
                    SourceState::Connecting,
                    s.down_since
                        .map(|since| format!("not connected since {since:.0}")),
                ),
            };
            SourceStatus {
                name: s.name.clone(),
                state,
                message,
            }
        })
        .collect();

    // Worst first: the one reason a person should look at.
    let degraded: Option<(&str, String)> = if let Some(refused) = &o.refused {
        let still = match running_generation {
            Some(g) => format!("still running generation {g}"),
            None => "nothing running".to_string(),
        };
        Some((
            "InvalidSpec",
            format!(
                "generation {} refused, {still}: {}",
                refused.generation, refused.message
            ),
        ))
    } else if let Some(s) = o.sources.iter().find(|s| s.failure.is_some()) {
        Some((
            "SourceFailed",
            format!(
                "source {} stopped: {}",
                s.name,
                s.failure.as_deref().unwrap_or_default()
            ),
        ))
    } else if o.buffer_max_bytes > 0
        && o.backlog.bytes as f64 >= limits.buffer_full * o.buffer_max_bytes as f64
    {
        Some((
            "BufferFull",
            format!(
                "buffer holds {} of {} bytes",
                o.backlog.bytes, o.buffer_max_bytes
            ),
        ))
    } else if o.running && longer_than(o.uplink_down_since, o.now, limits.uplink_down) {
        Some((
            "UplinkDown",
            format!(
                "no session with the ingest since {:.0}; {} records buffered",
                o.uplink_down_since.unwrap_or(o.now),
                o.backlog.records
            ),
        ))
    } else if let Some(s) = o
        .sources
        .iter()
        .find(|s| !s.up && longer_than(s.down_since, o.now, limits.source_down))
    {
        Some((
            "SourceDown",
            format!(
                "source {} not connected since {:.0}",
                s.name,
                s.down_since.unwrap_or(o.now)
            ),
        ))
    } else {
        None
    };

    let not_ready: Option<String> = if !o.running {
        Some(match &o.refused {
            Some(_) => "no valid spec to run yet".into(),
            None => "starting".into(),
        })
    } else if o.refused.is_some() {
        Some("the newest spec was refused".into())
    } else if newest_sent.is_some() && running_generation != newest_sent {
        Some(format!(
            "applying generation {}",
            newest_sent.unwrap_or_default()
        ))
    } else if let Some(s) = o.sources.iter().find(|s| s.failure.is_some()) {
        Some(format!("source {} stopped", s.name))
    } else {
        o.sources
            .iter()
            .find(|s| !s.up)
            .map(|s| format!("source {} not connected", s.name))
    };

    let message = degraded
        .as_ref()
        .map(|(_, m)| m.clone())
        .or_else(|| not_ready.clone())
        .map(truncate);
    NodeStatus {
        node: o.node.clone(),
        observed_generation: observed,
        applied_generation: running_generation,
        ready: not_ready.is_none(),
        degraded_reason: degraded.map(|(reason, _)| reason.to_string()),
        message,
        backlog: o.backlog,
        last_acked_time: o.last_acked.map(Time),
        config_hash: o.running_hash.clone(),
        sources,
        heartbeat_time: Time(o.now),
    }
}

/// The server-side apply body for the status subresource: `mine` as this
/// agent's entry and the summary over every entry of `object` (the object
/// as last read) with `mine` in place of this node's. With `precondition`,
/// the object's resourceVersion makes the server refuse (409) the write if
/// anyone wrote in between, so the summary never misses an entry.
pub fn apply_body(
    object: &DynamicObject,
    mine: &NodeStatus,
    stale_after: Duration,
    precondition: bool,
) -> Value {
    let mut status: EdgePipelineStatus = object
        .data
        .get("status")
        .cloned()
        .and_then(|s| serde_json::from_value(s).ok())
        .unwrap_or_default();
    status.nodes.retain(|n| n.node != mine.node);
    status.nodes.push(mine.clone());
    let now = mine.heartbeat_time.clone();
    let stale_before = SignedDuration::try_from(stale_after)
        .ok()
        .and_then(|d| now.0.checked_sub(d).ok())
        .unwrap_or(Timestamp::MIN);
    status.summarise(
        object.metadata.generation.unwrap_or(0),
        &Time(stale_before),
        &now,
    );
    // Only this agent's entry: the others belong to their own agents.
    status.nodes = vec![mine.clone()];

    let mut metadata = json!({
        "name": object.metadata.name,
        "namespace": object.metadata.namespace,
    });
    if precondition {
        if let Some(rv) = &object.metadata.resource_version {
            metadata["resourceVersion"] = json!(rv);
        }
    }
    json!({
        "apiVersion": format!("{}/{}", edgefleet_fleet::GROUP, edgefleet_fleet::VERSION),
        "kind": "EdgePipeline",
        "metadata": metadata,
        "status": status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefleet_fleet::{CONDITION_DEGRADED, CONDITION_READY};

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).unwrap()
    }

    fn observation() -> Observation {
        Observation {
            node: "gw-1".into(),
            now: at(1000),
            running: true,
            running_hash: "h2".into(),
            sent: vec![(1, "h1".into()), (2, "h2".into())],
            refused: None,
            backlog: Backlog {
                records: 5,
                bytes: 500,
            },
            buffer_max_bytes: 1 << 20,
            last_acked: Some(at(999)),
            sources: vec![SourceObservation {
                name: "mqtt".into(),
                up: true,
                failure: None,
                down_since: None,
            }],
            uplink_down_since: None,
        }
    }

    #[test]
    fn a_healthy_agent_is_ready_on_its_generation() {
        let status = node_status(&observation(), &Thresholds::default());
        assert!(status.ready, "{status:?}");
        assert_eq!(status.observed_generation, 2);
        assert_eq!(status.applied_generation, Some(2));
        assert_eq!(status.degraded_reason, None);
        assert_eq!(status.message, None);
        assert_eq!(status.sources[0].state, SourceState::Running);
        assert_eq!(status.last_acked_time, Some(Time(at(999))));
    }

    #[test]
    fn a_refused_spec_is_observed_and_degrades_while_the_old_one_runs() {
        let mut o = observation();
        o.refused = Some(Refusal {
            generation: 3,
            message: "spec.uplink.caFile: file `x` does not exist".into(),
        });
        let status = node_status(&o, &Thresholds::default());
        assert!(!status.ready);
        assert_eq!(status.observed_generation, 3);
        assert_eq!(status.applied_generation, Some(2));
        assert_eq!(status.degraded_reason.as_deref(), Some("InvalidSpec"));
        let message = status.message.unwrap();
        assert!(
            message.starts_with(
                "generation 3 refused, still running generation 2: spec.uplink.caFile"
            ),
            "{message}"
        );
    }

    #[test]
    fn a_generation_not_yet_running_is_not_ready_and_not_observed() {
        let mut o = observation();
        o.sent.push((3, "h3".into()));
        let status = node_status(&o, &Thresholds::default());
        assert!(!status.ready);
        assert_eq!(status.observed_generation, 2);
        assert_eq!(status.message.as_deref(), Some("applying generation 3"));
    }

    #[test]
    fn the_same_configuration_under_a_new_generation_runs_that_generation() {
        let mut o = observation();
        o.sent.push((3, "h2".into()));
        let status = node_status(&o, &Thresholds::default());
        assert!(status.ready, "{status:?}");
        assert_eq!(status.applied_generation, Some(3));
    }

    #[test]
    fn degradation_takes_the_worst_reason_and_waits_for_thresholds() {
        let limits = Thresholds::default();
        let mut o = observation();
        o.uplink_down_since = Some(at(990));
        o.sources[0].up = false;
        o.sources[0].down_since = Some(at(995));
        let status = node_status(&o, &limits);
        assert_eq!(status.degraded_reason, None, "too early: {status:?}");
        assert!(!status.ready);
        assert_eq!(status.sources[0].state, SourceState::Connecting);

        o.uplink_down_since = Some(at(900));
        let status = node_status(&o, &limits);
        assert_eq!(status.degraded_reason.as_deref(), Some("UplinkDown"));
        assert!(status.message.unwrap().contains("5 records buffered"));

        o.backlog.bytes = 1 << 20;
        assert_eq!(
            node_status(&o, &limits).degraded_reason.as_deref(),
            Some("BufferFull")
        );

        o.sources[0].failure = Some("bad filter".into());
        let status = node_status(&o, &limits);
        assert_eq!(status.degraded_reason.as_deref(), Some("SourceFailed"));
        assert_eq!(status.sources[0].state, SourceState::Failed);
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let mut o = observation();
        o.refused = Some(Refusal {
            generation: 3,
            message: "é".repeat(5000),
        });
        let message = node_status(&o, &Thresholds::default()).message.unwrap();
        assert!(message.len() <= MAX_MESSAGE + 4);
        assert!(message.ends_with(" ..."));
    }

    fn object(status: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "edgefleet.io/v1alpha1",
            "kind": "EdgePipeline",
            "metadata": {"name": "edge-agent", "namespace": "edgefleet", "generation": 2, "resourceVersion": "41"},
            "spec": {},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn the_body_carries_only_this_node_and_a_summary_over_all() {
        let other = node_status(
            &Observation {
                node: "gw-2".into(),
                backlog: Backlog {
                    records: 7,
                    bytes: 700,
                },
                ..observation()
            },
            &Thresholds::default(),
        );
        let mut mine = node_status(&observation(), &Thresholds::default());
        // An older entry of this node is replaced, not summed.
        let mut stale_self = mine.clone();
        stale_self.backlog.records = 1000;
        let object = object(json!({"nodes": [other, stale_self]}));
        mine.backlog.records = 5;
        let body = apply_body(&object, &mine, Duration::from_secs(120), true);
        assert_eq!(body["metadata"]["resourceVersion"], "41");
        assert_eq!(body["kind"], "EdgePipeline");
        let status: EdgePipelineStatus = serde_json::from_value(body["status"].clone()).unwrap();
        assert_eq!(status.nodes.len(), 1);
        assert_eq!(status.nodes[0].node, "gw-1");
        assert_eq!(status.backlog.unwrap().records, 12);
        assert_eq!(status.observed_generation, Some(2));
        assert_eq!(status.condition(CONDITION_READY).unwrap().status, "True");
        assert_eq!(
            status.condition(CONDITION_DEGRADED).unwrap().status,
            "False"
        );

        let body = apply_body(&object, &mine, Duration::from_secs(120), false);
        assert!(body["metadata"].get("resourceVersion").is_none());
    }

    #[test]
    fn a_refusal_reaches_the_summary_conditions() {
        let mut o = observation();
        o.refused = Some(Refusal {
            generation: 2,
            message: "spec.buffer.maxBytes: too small".into(),
        });
        o.running_hash = "h1".into();
        o.sent.pop();
        let mine = node_status(&o, &Thresholds::default());
        let body = apply_body(&object(json!({})), &mine, Duration::from_secs(120), true);
        let status: EdgePipelineStatus = serde_json::from_value(body["status"].clone()).unwrap();
        // Observed, so Argo CD's health check looks at the conditions
        // instead of waiting for the generation forever.
        assert_eq!(status.observed_generation, Some(2));
        let degraded = status.condition(CONDITION_DEGRADED).unwrap();
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "InvalidSpec")
        );
        assert!(degraded.message.contains("spec.buffer.maxBytes: too small"));
        assert!(degraded.message.contains("still running generation 1"));
        assert_eq!(status.condition(CONDITION_READY).unwrap().status, "False");
    }
}
