//! Runs the Argo CD health check for EdgePipeline, taken from the committed
//! argocd-cm, on sample objects (Lua 5.1, as Argo CD's gopher-lua).

use std::path::PathBuf;

use edgefleet_fleet::{Backlog, EdgePipelineStatus, NodeStatus, SourceState, SourceStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use mlua::{Lua, LuaSerdeExt, Table};
use serde_json::{json, Value};

const KEY: &str = "resource.customizations.health.edgefleet.io_EdgePipeline";

fn script() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../gitops/argocd/argocd-cm.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let cm: Value = serde_yaml_ng::from_str(&text).unwrap();
    cm["data"][KEY]
        .as_str()
        .unwrap_or_else(|| panic!("{} has no data.{KEY}", path.display()))
        .to_string()
}

/// (status, message) as Argo CD would read them.
fn health(object: &Value) -> (String, String) {
    let lua = Lua::new();
    lua.globals()
        .set("obj", lua.to_value(object).unwrap())
        .unwrap();
    let hs: Table = lua.load(script()).set_name("health.lua").eval().unwrap();
    (
        hs.get("status").unwrap(),
        hs.get::<Option<String>>("message")
            .unwrap()
            .unwrap_or_default(),
    )
}

fn pipeline(generation: i64, status: Option<Value>) -> Value {
    let mut object = json!({
        "apiVersion": "edgefleet.io/v1alpha1",
        "kind": "EdgePipeline",
        "metadata": {"name": "edge-agent", "namespace": "edgefleet", "generation": generation},
        "spec": {"uplink": {"endpoint": "https://ingest:7443", "caFile": "a", "certFile": "b", "keyFile": "c"}},
    });
    if let Some(status) = status {
        object["status"] = status;
    }
    object
}

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({"type": type_, "status": status, "reason": reason, "message": message,
           "lastTransitionTime": "2026-01-01T00:00:00Z"})
}

#[test]
fn no_status_is_progressing() {
    let (status, message) = health(&pipeline(1, None));
    assert_eq!(status, "Progressing");
    assert!(message.contains("Waiting"), "{message}");
    // A status without observedGeneration: no agent has applied anything.
    let (status, _) = health(&pipeline(1, Some(json!({"conditions": []}))));
    assert_eq!(status, "Progressing");
}

#[test]
fn stale_generation_is_progressing_even_if_ready() {
    let status = json!({"observedGeneration": 2, "conditions": [condition("Ready", "True", "AgentsReady", "2 agent(s) ready")]});
    let (health_status, message) = health(&pipeline(3, Some(status)));
    assert_eq!(health_status, "Progressing");
    assert_eq!(message, "Agents run generation 2 of 3");
}

#[test]
fn ready_is_healthy() {
    let status = json!({"observedGeneration": 3, "conditions": [
        condition("Ready", "True", "AgentsReady", "2 agent(s) ready"),
        condition("Degraded", "False", "AsExpected", "")]});
    assert_eq!(
        health(&pipeline(3, Some(status))),
        ("Healthy".into(), "2 agent(s) ready".into())
    );
}

#[test]
fn degraded_wins_over_ready() {
    let status = json!({"observedGeneration": 3, "conditions": [
        condition("Ready", "True", "AgentsReady", "2 agent(s) ready"),
        condition("Degraded", "True", "UplinkDown", "gw-1: UplinkDown")]});
    assert_eq!(
        health(&pipeline(3, Some(status))),
        ("Degraded".into(), "gw-1: UplinkDown".into())
    );
    // The reason stands in for an empty message.
    let status = json!({"observedGeneration": 3, "conditions": [condition("Degraded", "True", "BufferFull", "")]});
    assert_eq!(
        health(&pipeline(3, Some(status))),
        ("Degraded".into(), "BufferFull".into())
    );
}

#[test]
fn not_ready_or_unknown_is_progressing() {
    let status = json!({"observedGeneration": 3, "conditions": [condition("Ready", "False", "AgentNotReady", "gw-1: connecting")]});
    assert_eq!(
        health(&pipeline(3, Some(status))),
        ("Progressing".into(), "gw-1: connecting".into())
    );
    let status = json!({"observedGeneration": 3, "conditions": [condition("Ready", "Unknown", "Starting", "")]});
    assert_eq!(health(&pipeline(3, Some(status))).0, "Progressing");
    let status = json!({"observedGeneration": 3});
    assert_eq!(
        health(&pipeline(3, Some(status))),
        (
            "Progressing".into(),
            "Waiting for the Ready condition".into()
        )
    );
}

/// The status the Rust types produce (what the agents will write) is read
/// the way the summary means it.
#[test]
fn statuses_written_by_the_rust_types_map_as_intended() {
    let t = |s: i64| Time(Timestamp::from_second(1_800_000_000 + s).unwrap());
    let node = |name: &str, generation: i64, degraded: Option<&str>| NodeStatus {
        node: name.into(),
        observed_generation: generation,
        applied_generation: Some(generation),
        ready: true,
        degraded_reason: degraded.map(str::to_string),
        message: None,
        backlog: Backlog {
            records: 10,
            bytes: 1000,
        },
        last_acked_time: Some(t(5)),
        config_hash: "abc".into(),
        sources: vec![SourceStatus {
            name: "mqtt".into(),
            state: SourceState::Running,
            message: None,
        }],
        heartbeat_time: t(10),
    };
    let mut status = EdgePipelineStatus {
        nodes: vec![node("gw-1", 4, None), node("gw-2", 4, None)],
        ..Default::default()
    };
    status.summarise(4, &t(0), &t(20));
    let object = pipeline(4, Some(serde_json::to_value(&status).unwrap()));
    assert_eq!(health(&object).0, "Healthy");

    status.nodes[1] = node("gw-2", 3, None);
    status.summarise(4, &t(0), &t(20));
    let object = pipeline(4, Some(serde_json::to_value(&status).unwrap()));
    assert_eq!(health(&object).0, "Progressing");

    status.nodes[1] = node("gw-2", 4, Some("UplinkDown"));
    status.summarise(4, &t(0), &t(20));
    let object = pipeline(4, Some(serde_json::to_value(&status).unwrap()));
    assert_eq!(
        health(&object),
        ("Degraded".into(), "gw-2: UplinkDown".into())
    );
}
