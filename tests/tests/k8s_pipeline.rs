//! The agent following an `EdgePipeline` on a real Kubernetes API server
//! (apiextensions-apiserver, started by `scripts/k8s-apiserver.sh test`,
//! which sets `EDGEFLEET_TEST_KUBECONFIG`): the real edge-agent binary, real
//! Mosquitto, real cloud-ingest. It changes the spec and checks the agent
//! applied it (records from the new subscription arrive, status and metrics
//! carry the new configuration hash), applies an invalid spec and checks the
//! status says why while the previous configuration keeps delivering, checks
//! that another node's status entry survives the agent's writes, and that the
//! agent starts from its cache and delivers with the API server unreachable.
//!
//! Without `EDGEFLEET_TEST_KUBECONFIG` the test says it did not run and
//! passes, unless `EDGEFLEET_K8S_REQUIRED=1` (the script sets it).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use edgefleet_fleet::{EdgePipeline, EdgePipelineStatus, NodeStatus};
use edgefleet_tests::{bin, free_port, http_get, metric, wait_until, Fleet, Proc};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use serde_json::{json, Value};

const NAME: &str = "edge-agent";
const NODE: &str = "gw-test";
const WAIT: Duration = Duration::from_secs(60);

struct Cluster {
    rt: tokio::runtime::Runtime,
    api: Api<EdgePipeline>,
    namespace: String,
}

impl Cluster {
    fn connect(kubeconfig: &Path) -> Cluster {
        let rt = tokio::runtime::Runtime::new().unwrap();
        // Unique per run, not only per process: the API server's etcd keeps
        // what earlier runs wrote, and a reused process id met a pipeline
        // already at generation 4.
        let namespace = format!(
            "pipeline-test-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let api = rt.block_on(async {
            let kubeconfig = Kubeconfig::read_from(kubeconfig).unwrap();
            let config =
                kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await
                    .unwrap();
            let client = Client::try_from(config).unwrap();
            install_crd(client.clone()).await;
            Api::namespaced(client, &namespace)
        });
        Cluster { rt, api, namespace }
    }

    /// Applies the spec as a GitOps tool would (server-side apply, its own manager).
    fn apply_spec(&self, spec: &Value) -> i64 {
        let body = json!({
            "apiVersion": "edgefleet.io/v1alpha1",
            "kind": "EdgePipeline",
            "metadata": {"name": NAME, "namespace": self.namespace},
            "spec": spec,
        });
        let applied = self
            .rt
            .block_on(self.api.patch(
                NAME,
                &PatchParams::apply("edgefleet-test-gitops").force(),
                &Patch::Apply(&body),
            ))
            .expect("the API server takes the spec");
        applied.metadata.generation.unwrap()
    }

    fn get(&self) -> EdgePipeline {
        self.rt.block_on(self.api.get(NAME)).unwrap()
    }

    fn status(&self) -> EdgePipelineStatus {
        self.get().status.unwrap_or_default()
    }

    fn node(&self, node: &str) -> Option<NodeStatus> {
        self.status().nodes.into_iter().find(|n| n.node == node)
    }

    /// Writes a status entry as the agent of `node` would.
    fn apply_node_entry(&self, node: &str, entry: Option<&NodeStatus>) {
        let status = match entry {
            Some(entry) => json!({"nodes": [entry]}),
            None => json!({}),
        };
        let body = json!({
            "apiVersion": "edgefleet.io/v1alpha1",
            "kind": "EdgePipeline",
            "metadata": {"name": NAME, "namespace": self.namespace},
            "status": status,
        });
        self.rt
            .block_on(self.api.patch_status(
                NAME,
                &PatchParams::apply(&format!("edge-agent@{node}")).force(),
                &Patch::Apply(&body),
            ))
            .unwrap();
    }
}

async fn install_crd(client: Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    let crd = edgefleet_fleet::crd();
    let name = crd.metadata.name.clone().unwrap();
    crds.patch(
        &name,
        &PatchParams::apply("edgefleet-test").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("the API server takes the CRD");
    for _ in 0..120 {
        let crd = crds.get(&name).await.unwrap();
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("the CRD did not become Established");
}

/// The agent configuration the pipeline carries; `prefix` is the MQTT topic
/// prefix it subscribes to.
fn spec(fleet: &Fleet, prefix: &str, ca_file: &Path, metrics_port: u16) -> Value {
    json!({
        "agent": {"dataDir": fleet.agent_data_dir("site").display().to_string()},
        "sources": {"mqtt": [{
            "name": "mqtt",
            "host": "127.0.0.1",
            "port": fleet.mqtt.port,
            "clientId": "edgefleet-site",
            "subscriptions": [{
                "topic": format!("{prefix}/+/telemetry"),
                "deviceFromTopic": format!("{prefix}/{{device}}/telemetry"),
            }],
        }]},
        "uplink": {
            "endpoint": format!("https://127.0.0.1:{}", fleet.ingest_port),
            "serverName": "localhost",
            "caFile": ca_file.display().to_string(),
            "certFile": fleet.pki.agent_cert("site").display().to_string(),
            "keyFile": fleet.pki.agent_key("site").display().to_string(),
            "backoff": {"initialMs": 100, "maxMs": 1000},
        },
        "metrics": {"listen": format!("127.0.0.1:{metrics_port}")},
    })
}

/// The hash `edge-agent check-config` prints for a spec.
fn config_hash(dir: &Path, spec: &Value) -> String {
    let file = dir.join(format!("spec-{}.yaml", free_port()));
    std::fs::write(&file, serde_json::to_string_pretty(spec).unwrap()).unwrap();
    let out = Command::new(bin("edge-agent"))
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check-config: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.trim_end()
        .rsplit_once("config hash ")
        .map(|(_, h)| h.trim_end_matches(')').to_string())
        .unwrap()
}

fn start_agent(fleet: &Fleet, kubeconfig: &Path, namespace: &str, log: &str) -> Proc {
    Proc::spawn(
        "edge-agent",
        Command::new(bin("edge-agent"))
            .arg("run")
            .arg("--pipeline")
            .arg(NAME)
            .arg("--namespace")
            .arg(namespace)
            .arg("--status-interval")
            .arg("2")
            .arg("--pipeline-cache")
            .arg(fleet.dir.path().join("pipeline-cache.json"))
            .env("KUBECONFIG", kubeconfig)
            .env("NODE_NAME", NODE)
            .env("RUST_LOG", "info"),
        fleet.dir.path().join(log),
    )
    .unwrap()
}

fn publish(fleet: &Fleet, prefix_devices: (&str, u32), messages: u64) -> u64 {
    // devsim's --prefix picks the topic; the harness's publish uses the default.
    let (prefix, devices) = prefix_devices;
    let out = fleet.dir.path().join(format!("devsim-{}.out", free_port()));
    let mut proc = Proc::spawn(
        "devsim",
        Command::new(bin("devsim"))
            .arg("--port")
            .arg(fleet.mqtt.port.to_string())
            .arg("--devices")
            .arg(devices.to_string())
            .arg("--messages")
            .arg(messages.to_string())
            .arg("--rate")
            .arg("500")
            .arg("--prefix")
            .arg(prefix)
            .arg("--client-id")
            .arg(format!("devsim-{}", free_port())),
        out.clone(),
    )
    .unwrap();
    assert!(
        wait_until(WAIT, || !proc.is_running()),
        "devsim did not finish"
    );
    let text = std::fs::read_to_string(&out).unwrap();
    let line = text.lines().rev().find(|l| l.starts_with('{')).unwrap();
    serde_json::from_str::<Value>(line).unwrap()["acknowledged"]
        .as_u64()
        .unwrap()
}

fn agent_metric(port: u16, name: &str, labels: &str) -> Option<f64> {
    http_get(port, "/metrics")
        .ok()
        .and_then(|text| metric(&text, name, labels))
}

#[test]
fn the_agent_follows_its_edge_pipeline_and_reports_the_truth() {
    let Some(kubeconfig) = std::env::var_os("EDGEFLEET_TEST_KUBECONFIG") else {
        assert!(
            std::env::var("EDGEFLEET_K8S_REQUIRED").as_deref() != Ok("1"),
            "EDGEFLEET_K8S_REQUIRED=1 but no EDGEFLEET_TEST_KUBECONFIG: the API server test did not run"
        );
        eprintln!("NOT RUN: no EDGEFLEET_TEST_KUBECONFIG (scripts/k8s-apiserver.sh test runs this test against a real API server)");
        return;
    };
    let kubeconfig = Path::new(&kubeconfig).to_path_buf();
    let mut fleet = Fleet::new(&["site"]).unwrap();
    fleet.start_ingest().unwrap();
    let cluster = Cluster::connect(&kubeconfig);
    let dir = fleet.dir.path().to_path_buf();
    let ca = fleet.pki.ca_cert();
    let metrics_port = free_port();

    // Generation 1: devices/+/telemetry.
    let v1 = spec(&fleet, "devices", &ca, metrics_port);
    let hash1 = config_hash(&dir, &v1);
    assert_eq!(cluster.apply_spec(&v1), 1);
    let mut agent = start_agent(&fleet, &kubeconfig, &cluster.namespace, "agent.log");
    let ready_on = |generation: i64, hash: &str| {
        cluster.node(NODE).is_some_and(|n| {
            n.ready
                && n.observed_generation == generation
                && n.applied_generation == Some(generation)
                && n.config_hash == hash
        })
    };
    assert!(
        wait_until(WAIT, || ready_on(1, &hash1)),
        "no ready status for generation 1: {:?}\n{}",
        cluster.status(),
        agent.log_text()
    );
    let status = cluster.status();
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.config_hash.as_deref(), Some(hash1.as_str()));
    let ready = status.condition("Ready").unwrap();
    assert_eq!(ready.status, "True", "{status:?}");
    assert_eq!(status.sources[0].name, "mqtt");
    let mut expected = publish(&fleet, ("devices", 3), 20);
    assert_eq!(expected, 60);
    assert!(
        wait_until(WAIT, || fleet.stored() >= expected),
        "stored {} of {expected}\n{}",
        fleet.stored(),
        agent.log_text()
    );

    // Generation 2: a new subscription. Applied live: status, metrics and
    // records from the new topic say so.
    let v2 = spec(&fleet, "plant", &ca, metrics_port);
    let hash2 = config_hash(&dir, &v2);
    assert_ne!(hash1, hash2);
    assert_eq!(cluster.apply_spec(&v2), 2);
    assert!(
        wait_until(WAIT, || ready_on(2, &hash2)),
        "generation 2 not applied: {:?}\n{}",
        cluster.status(),
        agent.log_text()
    );
    assert_eq!(
        agent_metric(
            metrics_port,
            "edge_config_info",
            &format!("hash=\"{hash2}\"")
        ),
        Some(1.0)
    );
    assert_eq!(
        agent_metric(
            metrics_port,
            "edge_config_reloads_total",
            "reason=\"applied\""
        ),
        Some(1.0)
    );
    expected += publish(&fleet, ("plant", 3), 20);
    assert!(
        wait_until(WAIT, || fleet.stored() >= expected),
        "records from the new subscription: stored {} of {expected}\n{}",
        fleet.stored(),
        agent.log_text()
    );
    let last_acked = cluster.status().last_acked_time;
    assert!(last_acked.is_some(), "{:?}", cluster.status());

    // Another gateway's agent shares the pipeline: the agent's writes keep
    // its entry and count it in the summary.
    let mut other = cluster.node(NODE).unwrap();
    other.node = "gw-other".into();
    other.backlog.records = 1000;
    other.heartbeat_time =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    cluster.apply_node_entry("gw-other", Some(&other));
    let before = cluster.node(NODE).unwrap().heartbeat_time;
    assert!(
        wait_until(WAIT, || {
            let status = cluster.status();
            let mine = status.nodes.iter().find(|n| n.node == NODE);
            mine.is_some_and(|m| m.heartbeat_time != before)
                && status.nodes.iter().any(|n| n.node == "gw-other")
                && status.backlog.is_some_and(|b| b.records >= 1000)
                && status
                    .condition("Ready")
                    .is_some_and(|c| c.message == "2 agent(s) ready")
        }),
        "the other node's entry or the summary over both is missing: {:?}",
        cluster.status()
    );
    cluster.apply_node_entry("gw-other", None);
    assert!(
        wait_until(WAIT, || cluster.node("gw-other").is_none()),
        "the other node's agent could not remove its own entry"
    );

    // Generation 3: valid for the API server, not for this node (the CA file
    // is not there). Refused: Degraded with the reason; generation 2 runs on.
    let v3 = spec(&fleet, "plant", &dir.join("no-such-ca.pem"), metrics_port);
    assert_eq!(cluster.apply_spec(&v3), 3);
    assert!(
        wait_until(WAIT, || cluster
            .node(NODE)
            .is_some_and(|n| n.observed_generation == 3)),
        "generation 3 not observed: {:?}\n{}",
        cluster.status(),
        agent.log_text()
    );
    let mine = cluster.node(NODE).unwrap();
    assert!(!mine.ready);
    assert_eq!(mine.applied_generation, Some(2));
    assert_eq!(mine.config_hash, hash2);
    assert_eq!(mine.degraded_reason.as_deref(), Some("InvalidSpec"));
    let status = cluster.status();
    assert_eq!(status.observed_generation, Some(3));
    let degraded = status.condition("Degraded").unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "InvalidSpec"),
        "{status:?}"
    );
    assert!(
        degraded.message.contains("spec.uplink.caFile")
            && degraded.message.contains("no-such-ca.pem")
            && degraded.message.contains("still running generation 2"),
        "{}",
        degraded.message
    );
    assert_eq!(status.condition("Ready").unwrap().status, "False");
    assert_eq!(
        agent_metric(
            metrics_port,
            "edge_config_reloads_total",
            "reason=\"rejected\""
        ),
        Some(1.0)
    );
    expected += publish(&fleet, ("plant", 3), 20);
    assert!(
        wait_until(WAIT, || fleet.stored() >= expected),
        "the previous configuration stopped delivering: stored {} of {expected}\n{}",
        fleet.stored(),
        agent.log_text()
    );

    // Generation 4 repairs it: ready again, not degraded.
    let mut v4 = v2.clone();
    v4["buffer"] = json!({"flush": {"maxDelayMs": 3}});
    let hash4 = config_hash(&dir, &v4);
    assert_eq!(cluster.apply_spec(&v4), 4);
    assert!(
        wait_until(WAIT, || ready_on(4, &hash4)
            && cluster
                .status()
                .condition("Degraded")
                .is_some_and(|c| c.status == "False")),
        "generation 4 did not repair: {:?}\n{}",
        cluster.status(),
        agent.log_text()
    );

    // SIGTERM: exits cleanly and says so in its entry.
    assert_eq!(agent.terminate(Duration::from_secs(60)).unwrap(), Some(0));
    let mine = cluster.node(NODE).unwrap();
    assert!(!mine.ready);
    assert_eq!(mine.message.as_deref(), Some("agent stopped"));

    // The API server unreachable: the agent starts from its cache and
    // delivers; /readyz does not depend on the cluster.
    // The same credentials, pointed at a port nothing listens on.
    let unreachable = dir.join("unreachable.kubeconfig");
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    let text: Vec<String> = text
        .lines()
        .map(|line| match line.split_once("server:") {
            Some((indent, _)) => format!("{indent}server: https://127.0.0.1:{}", free_port()),
            None => line.to_string(),
        })
        .collect();
    std::fs::write(&unreachable, text.join("\n")).unwrap();
    let mut offline = start_agent(
        &fleet,
        &unreachable,
        &cluster.namespace,
        "agent-offline.log",
    );
    assert!(
        wait_until(WAIT, || http_get(metrics_port, "/readyz")
            .is_ok_and(|b| b == "ready")
            && agent_metric(metrics_port, "edge_source_up", "source=\"mqtt\"")
                == Some(1.0)),
        "the agent did not start from its cache:\n{}",
        offline.log_text()
    );
    expected += publish(&fleet, ("plant", 3), 20);
    assert!(
        wait_until(WAIT, || fleet.stored() >= expected),
        "no delivery without the API server: stored {} of {expected}\n{}",
        fleet.stored(),
        offline.log_text()
    );
    assert_eq!(offline.terminate(Duration::from_secs(60)).unwrap(), Some(0));
    let log = offline.log_text();
    assert!(
        log.contains("starting with the cached configuration"),
        "{log}"
    );
}
