//! The sites committed under gitops/sites are valid, and the validator that
//! says so rejects what the API server would.

use std::path::PathBuf;

use edgefleet_fleet::{PipelineValidator, CRD_PATH};
use serde_json::{json, Value};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Validates against the committed CRD (what clusters get), which the crd
/// test keeps equal to the generated one.
fn validator() -> PipelineValidator {
    PipelineValidator::from_crd_yaml(&std::fs::read_to_string(repo_root().join(CRD_PATH)).unwrap())
        .unwrap()
}

#[test]
fn every_committed_site_is_valid() {
    let validator = validator();
    let sites = repo_root().join("gitops/sites");
    let mut checked = 0;
    for entry in std::fs::read_dir(&sites).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        edgefleet_fleet::validate_site_name(&name).unwrap();
        let text = std::fs::read_to_string(dir.join("edgepipeline.yaml")).unwrap();
        let problems = validator.check_yaml(&text);
        assert!(problems.is_empty(), "site {name}:\n{}", problems.join("\n"));
        assert!(
            text.contains("kind: EdgePipeline"),
            "site {name} has no EdgePipeline"
        );

        let secret: Value = serde_yaml_ng::from_str(
            &std::fs::read_to_string(dir.join("cluster-secret.yaml")).unwrap(),
        )
        .unwrap();
        let labels = &secret["metadata"]["labels"];
        assert_eq!(
            labels["edgefleet.io/site"],
            json!(name),
            "site {name}: cluster secret names another site"
        );
        assert_eq!(labels["edgefleet.io/role"], "edge", "site {name}");
        assert!(
            ["canary", "early", "main", "hold"]
                .contains(&labels["edgefleet.io/wave"].as_str().unwrap_or("")),
            "site {name}: wave {}",
            labels["edgefleet.io/wave"]
        );
        checked += 1;
    }
    assert!(checked >= 3, "expected the example sites, found {checked}");
}

fn good() -> Value {
    json!({
        "apiVersion": "edgefleet.io/v1alpha1",
        "kind": "EdgePipeline",
        "metadata": {"name": "edge-agent", "namespace": "edgefleet"},
        "spec": {
            "uplink": {"endpoint": "https://ingest:7443", "caFile": "/tls/ca.crt", "certFile": "/tls/tls.crt", "keyFile": "/tls/tls.key"},
            "buffer": {"maxBytes": "512MiB"},
            "sources": {"mqtt": [{"host": "broker", "clientId": "c1", "subscriptions": [{"topic": "devices/+/telemetry", "qos": 1}]}]}
        }
    })
}

fn problems_after(change: impl FnOnce(&mut Value)) -> Vec<String> {
    let mut doc = good();
    change(&mut doc);
    validator().check(&doc)
}

#[test]
fn accepts_a_good_pipeline() {
    assert_eq!(validator().check(&good()), Vec::<String>::new());
}

#[test]
fn rejects_unknown_fields_like_strict_field_validation() {
    let problems = problems_after(|d| d["spec"]["uplink"]["endpont"] = json!("x"));
    assert!(
        problems.iter().any(|p| p.contains("endpont")),
        "{problems:?}"
    );
    let problems =
        problems_after(|d| d["spec"]["sources"]["mqtt"][0]["subscriptions"][0]["qoss"] = json!(1));
    assert!(problems.iter().any(|p| p.contains("qoss")), "{problems:?}");
    let problems = problems_after(|d| d["spec"]["extra"] = json!({}));
    assert!(problems.iter().any(|p| p.contains("extra")), "{problems:?}");
}

#[test]
fn rejects_wrong_types_and_missing_fields() {
    let problems = problems_after(|d| d["spec"]["buffer"]["maxBytes"] = json!(true));
    assert!(
        problems.iter().any(|p| p.contains("/spec/buffer/maxBytes")),
        "{problems:?}"
    );
    let problems = problems_after(|d| d["spec"]["buffer"]["maxBytes"] = json!("12 parsecs"));
    assert!(
        problems.iter().any(|p| p.contains("maxBytes")),
        "{problems:?}"
    );
    let problems = problems_after(|d| {
        d["spec"].as_object_mut().unwrap().remove("uplink");
    });
    assert!(
        problems.iter().any(|p| p.contains("uplink")),
        "{problems:?}"
    );
    let problems = problems_after(|d| d["spec"]["sources"]["mqtt"][0]["port"] = json!(70000));
    assert!(problems.iter().any(|p| p.contains("port")), "{problems:?}");
    let problems = problems_after(|d| d["spec"]["buffer"]["whenFull"] = json!("sometimes"));
    assert!(
        problems.iter().any(|p| p.contains("whenFull")),
        "{problems:?}"
    );
}

#[test]
fn rejects_what_the_agent_would_refuse() {
    // Valid to the schema, refused by the agent's own checks.
    let problems =
        problems_after(|d| d["spec"]["sources"]["mqtt"][0]["subscriptions"][0]["qos"] = json!(2));
    assert!(
        problems
            .iter()
            .any(|p| p.contains("qos") && p.contains("not supported")),
        "{problems:?}"
    );
    let problems = problems_after(|d| d["spec"]["uplink"]["endpoint"] = json!("ingest:7443"));
    assert!(
        problems.iter().any(|p| p.contains("uplink.endpoint")),
        "{problems:?}"
    );
}

#[test]
fn rejects_other_kinds_and_bad_names() {
    let problems = problems_after(|d| d["kind"] = json!("EdgePipelin"));
    assert!(problems[0].contains("not an EdgePipeline"), "{problems:?}");
    let problems = problems_after(|d| d["metadata"]["name"] = json!("Edge_Agent"));
    assert!(
        problems.iter().any(|p| p.contains("DNS-1123")),
        "{problems:?}"
    );
}

#[test]
fn yaml_streams_check_only_edgepipelines() {
    let stream = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\n".to_string()
        + &serde_yaml_ng::to_string(&problems_doc()).unwrap();
    let problems = validator().check_yaml(&stream);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with("EdgePipeline edgefleet/edge-agent: "),
        "{problems:?}"
    );
}

fn problems_doc() -> Value {
    let mut doc = good();
    doc["spec"]["metrics"] = json!({"listen": 9464});
    doc
}
