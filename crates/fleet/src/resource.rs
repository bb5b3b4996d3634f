//! The `EdgePipeline` custom resource.
//!
//! Its `spec` is the agent's configuration ([`AgentConfig`]) unchanged, so a
//! spec can be copied into the agent's YAML file and back. The `status` is
//! written by the agents (`edge-agent run --pipeline`) and read by people (`kubectl get`), by
//! Argo CD's health check (`gitops/argocd/argocd-cm.yaml`) and by the
//! progressive rollout, which waits for `Healthy`.

use std::collections::BTreeMap;

use edgefleet_config::AgentConfig;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every edgefleet custom resource.
pub const GROUP: &str = "edgefleet.io";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

/// Condition type: every agent reporting has applied the current generation
/// and moves data.
pub const CONDITION_READY: &str = "Ready";
/// Condition type: something needs a person (a source failing, the uplink
/// down so the backlog grows, the buffer full).
pub const CONDITION_DEGRADED: &str = "Degraded";

/// The agent configuration of every gateway of the site, in the same form as
/// the agent's YAML configuration file. The sources it names (MQTT broker,
/// CAN interfaces) must exist on every gateway node of the site.
//
// One `EdgePipeline` per site cluster, in the agents' namespace; every
// gateway node's agent (`edge-agent run --pipeline NAME --namespace NS`)
// follows it. `serde(transparent)` makes the spec *be* the configuration
// rather than hold it under a field, so `spec:` and the file have one shape.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
// Each printcolumn(...) repeats `type_`/`priority`; clippy takes the repeats
// for duplicates of one attribute.
#[allow(clippy::duplicated_attributes)]
#[kube(
    group = "edgefleet.io",
    version = "v1alpha1",
    kind = "EdgePipeline",
    plural = "edgepipelines",
    singular = "edgepipeline",
    shortname = "epl",
    category = "edgefleet",
    namespaced,
    status = "EdgePipelineStatus",
    derive = "PartialEq",
    doc = "Desired configuration of the edgefleet agents of one site; the spec is the agent's configuration file.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#,
        description = "Whether every agent applied this generation and moves data"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].reason"#,
        priority = "1"
    ),
    printcolumn(
        name = "Backlog",
        type_ = "integer",
        json_path = ".status.backlog.records",
        description = "Records buffered on the gateways, not yet acknowledged by the ingest"
    ),
    printcolumn(
        name = "Last-Ack",
        type_ = "date",
        json_path = ".status.lastAckedTime",
        priority = "1"
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".spec.uplink.endpoint",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(transparent)]
pub struct EdgePipelineSpec(pub AgentConfig);

impl std::ops::Deref for EdgePipelineSpec {
    type Target = AgentConfig;
    fn deref(&self) -> &AgentConfig {
        &self.0
    }
}

impl From<AgentConfig> for EdgePipelineSpec {
    fn from(config: AgentConfig) -> Self {
        Self(config)
    }
}

/// What the site's agents report: a summary of the site, and one entry per
/// gateway node in `nodes`.
//
// Several agents (one per node of the DaemonSet) share one `EdgePipeline`.
// Each writes with server-side apply under a field manager of its own
// (`edge-agent@<node>`): `nodes` is a map list keyed by `node`, so an agent
// owns its entry and can neither overwrite nor delete another's. It applies
// its entry together with the summary it recomputed (`summarise`) from every
// entry of the object it last read, with that object's resourceVersion as a
// precondition, so a summary never misses an entry written in between (on a
// conflict it reads again and recomputes). The summary fields change owner
// with every write (applied with force): they are shared, the entries are not.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgePipelineStatus {
    /// The `metadata.generation` every reporting agent has applied (the
    /// lowest of theirs). Below `metadata.generation` means a change is
    /// still rolling out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Kubernetes conditions: `Ready` and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Data buffered on the site's gateways and not yet acknowledged (sum over nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<Backlog>,
    /// Latest time the ingest acknowledged a batch from any of the site's agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_acked_time: Option<Time>,
    /// Hash of the configuration the agents run (as `edge-agent check-config`
    /// prints it), when they all run the same one; absent while they differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// State of each source, worst over the nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub sources: Vec<SourceStatus>,
    /// One entry per agent, written by that agent only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub nodes: Vec<NodeStatus>,
}

/// Buffered, unacknowledged data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Backlog {
    pub records: u64,
    pub bytes: u64,
}

/// One source's state as an agent sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceStatus {
    /// The source's name: the MQTT source's `name`, the CAN interface, or
    /// the replay's source.
    pub name: String,
    pub state: SourceState,
    /// Why, for anything but `Running`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Ordered from best to worst so the summary can take the maximum.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum SourceState {
    /// Receiving (or ready to receive) data.
    Running,
    /// Not yet connected, or reconnecting after a failure.
    Connecting,
    /// Not receiving, and the agent does not expect to recover without a change.
    Failed,
}

/// What one agent (one gateway node) reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// The Kubernetes node the agent runs on.
    pub node: String,
    /// The newest generation of the spec this agent has acted on: applied,
    /// or refused as invalid (then `degradedReason` is `InvalidSpec` and
    /// `appliedGeneration` the generation it still runs).
    pub observed_generation: i64,
    /// The generation of the spec this agent runs (after a restart without
    /// the API server: the one it saved when it last applied a spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_generation: Option<i64>,
    pub ready: bool,
    /// Set when the agent degrades (uplink down past its ack timeout, buffer
    /// full, a source failed); a short CamelCase reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub backlog: Backlog,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_acked_time: Option<Time>,
    pub config_hash: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceStatus>,
    /// When the agent last wrote this entry; entries older than the caller's
    /// cut-off (a node removed from the site) are left out of the summary.
    pub heartbeat_time: Time,
}

impl EdgePipelineStatus {
    /// Recomputes the summary fields from `nodes`, leaving out entries whose
    /// heartbeat is older than `stale_before`. `generation` is the resource's
    /// `metadata.generation`; `now` stamps changed conditions. Conditions
    /// keep their `lastTransitionTime` when their status does not change, as
    /// Kubernetes conventions ask.
    pub fn summarise(&mut self, generation: i64, stale_before: &Time, now: &Time) {
        // Cloned so the summary fields can be written while reading them.
        let live: Vec<NodeStatus> = self
            .nodes
            .iter()
            .filter(|n| n.heartbeat_time.0 >= stale_before.0)
            .cloned()
            .collect();

        self.observed_generation = live.iter().map(|n| n.observed_generation).min();
        self.backlog = (!live.is_empty()).then(|| Backlog {
            records: live.iter().map(|n| n.backlog.records).sum(),
            bytes: live.iter().map(|n| n.backlog.bytes).sum(),
        });
        self.last_acked_time = live.iter().filter_map(|n| n.last_acked_time.clone()).max();
        let first_hash = live.first().map(|n| &n.config_hash);
        self.config_hash = first_hash
            .filter(|h| live.iter().all(|n| &&n.config_hash == h))
            .cloned();

        let mut worst: BTreeMap<&str, &SourceStatus> = BTreeMap::new();
        for source in live.iter().flat_map(|n| &n.sources) {
            let entry = worst.entry(&source.name).or_insert(source);
            if source.state > entry.state {
                *entry = source;
            }
        }
        self.sources = worst.into_values().cloned().collect();

        let current = live.iter().all(|n| n.observed_generation >= generation);
        let (ready, reason, message) = if live.is_empty() {
            (
                false,
                "NoAgents",
                "no agent has reported recently".to_string(),
            )
        } else if !current {
            let behind: Vec<&str> = live
                .iter()
                .filter(|n| n.observed_generation < generation)
                .map(|n| n.node.as_str())
                .collect();
            (
                false,
                "Applying",
                format!(
                    "generation {generation} not yet applied on {}",
                    behind.join(", ")
                ),
            )
        } else if let Some(not_ready) = live.iter().find(|n| !n.ready) {
            (
                false,
                "AgentNotReady",
                format!(
                    "{}: {}",
                    not_ready.node,
                    not_ready.message.as_deref().unwrap_or("not ready")
                ),
            )
        } else {
            (
                true,
                "AgentsReady",
                format!("{} agent(s) ready", live.len()),
            )
        };
        self.set_condition(CONDITION_READY, ready, reason, &message, generation, now);

        let degraded: Vec<String> = live
            .iter()
            .filter_map(|n| {
                n.degraded_reason.as_ref().map(|r| {
                    format!(
                        "{}: {r}{}",
                        n.node,
                        n.message
                            .as_deref()
                            .map(|m| format!(" ({m})"))
                            .unwrap_or_default()
                    )
                })
            })
            .collect();
        if degraded.is_empty() {
            self.set_condition(CONDITION_DEGRADED, false, "AsExpected", "", generation, now);
        } else {
            let reason = live
                .iter()
                .find_map(|n| n.degraded_reason.clone())
                .unwrap_or_default();
            self.set_condition(
                CONDITION_DEGRADED,
                true,
                &reason,
                &degraded.join("; "),
                generation,
                now,
            );
        }
    }

    /// Sets a condition, keeping its transition time when the status is unchanged.
    pub fn set_condition(
        &mut self,
        type_: &str,
        status: bool,
        reason: &str,
        message: &str,
        generation: i64,
        now: &Time,
    ) {
        let status = if status { "True" } else { "False" }.to_string();
        let fresh = Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message: message.to_string(),
            observed_generation: Some(generation),
            last_transition_time: now.clone(),
        };
        match self.conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(existing) => {
                let since = if existing.status == fresh.status {
                    existing.last_transition_time.clone()
                } else {
                    fresh.last_transition_time.clone()
                };
                *existing = Condition {
                    last_transition_time: since,
                    ..fresh
                };
            }
            None => self.conditions.push(fresh),
        }
    }

    /// The condition of the given type, if present.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(1_800_000_000 + second).unwrap())
    }

    fn node(name: &str, generation: i64, records: u64, heartbeat: i64) -> NodeStatus {
        NodeStatus {
            node: name.into(),
            observed_generation: generation,
            applied_generation: Some(generation),
            ready: true,
            degraded_reason: None,
            message: None,
            backlog: Backlog {
                records,
                bytes: records * 100,
            },
            last_acked_time: Some(at(heartbeat - 1)),
            config_hash: "h1".into(),
            sources: vec![SourceStatus {
                name: "can0".into(),
                state: SourceState::Running,
                message: None,
            }],
            heartbeat_time: at(heartbeat),
        }
    }

    #[test]
    fn summary_adds_up_the_live_nodes_and_ignores_stale_ones() {
        let mut status = EdgePipelineStatus {
            nodes: vec![
                node("gw-1", 5, 10, 100),
                node("gw-2", 4, 20, 90),
                node("gone", 1, 999, 10),
            ],
            ..Default::default()
        };
        status.nodes[1].sources[0].state = SourceState::Connecting;
        status.summarise(5, &at(50), &at(100));
        assert_eq!(status.observed_generation, Some(4));
        assert_eq!(
            status.backlog,
            Some(Backlog {
                records: 30,
                bytes: 3000
            })
        );
        assert_eq!(status.last_acked_time, Some(at(99)));
        assert_eq!(status.config_hash.as_deref(), Some("h1"));
        assert_eq!(status.sources.len(), 1);
        assert_eq!(status.sources[0].state, SourceState::Connecting);
        let ready = status.condition(CONDITION_READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "Applying")
        );
        assert!(ready.message.contains("gw-2"), "{}", ready.message);
        assert!(!ready.message.contains("gone"), "{}", ready.message);
    }

    #[test]
    fn differing_configurations_have_no_hash() {
        let mut status = EdgePipelineStatus {
            nodes: vec![node("gw-1", 5, 0, 100), node("gw-2", 5, 0, 100)],
            ..Default::default()
        };
        status.nodes[1].config_hash = "h2".into();
        status.summarise(5, &at(0), &at(100));
        assert_eq!(status.config_hash, None);
        assert_eq!(status.condition(CONDITION_READY).unwrap().status, "True");
    }

    #[test]
    fn no_live_node_is_not_ready() {
        let mut status = EdgePipelineStatus {
            nodes: vec![node("gw-1", 5, 0, 10)],
            ..Default::default()
        };
        status.summarise(5, &at(50), &at(100));
        assert_eq!(status.observed_generation, None);
        assert_eq!(status.backlog, None);
        assert_eq!(
            status.condition(CONDITION_READY).unwrap().reason,
            "NoAgents"
        );
    }

    #[test]
    fn transition_time_moves_only_when_the_status_changes() {
        let mut status = EdgePipelineStatus {
            nodes: vec![node("gw-1", 5, 0, 100)],
            ..Default::default()
        };
        status.summarise(5, &at(0), &at(100));
        status.summarise(5, &at(0), &at(200));
        let ready = status.condition(CONDITION_READY).unwrap();
        assert_eq!(ready.last_transition_time, at(100));
        status.nodes[0].degraded_reason = Some("UplinkDown".into());
        status.summarise(5, &at(0), &at(300));
        let degraded = status.condition(CONDITION_DEGRADED).unwrap();
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "UplinkDown")
        );
        assert_eq!(degraded.last_transition_time, at(300));
        assert_eq!(
            status
                .condition(CONDITION_READY)
                .unwrap()
                .last_transition_time,
            at(100)
        );
        assert_eq!(status.conditions.len(), 2);
    }
}
