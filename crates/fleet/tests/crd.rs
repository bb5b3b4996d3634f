//! The committed CRD is the one the code generates, and it is a structural
//! schema the API server will accept.

use std::path::PathBuf;

use edgefleet_fleet::{crd, crd_yaml, CRD_PATH};
use serde_json::Value;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn committed_crd_matches_the_generated_one() {
    let generated = crd_yaml().unwrap();
    let path = repo_root().join(CRD_PATH);
    if std::env::var_os("EDGEFLEET_BLESS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &generated).unwrap();
        eprintln!("wrote {}", path.display());
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != generated {
        let first_difference = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(committed.lines().count().min(generated.lines().count()));
        panic!(
            "{CRD_PATH} is out of date with the EdgePipeline types (first difference at line {}).\n\
             Regenerate it with:\n    EDGEFLEET_BLESS=1 cargo test -p edgefleet-fleet --test crd\n\
             and commit the result.",
            first_difference + 1
        );
    }
}

#[test]
fn crd_names_scope_subresources_and_columns() {
    let crd = serde_json::to_value(crd()).unwrap();
    assert_eq!(crd["metadata"]["name"], "edgepipelines.edgefleet.io");
    assert_eq!(crd["spec"]["group"], "edgefleet.io");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["kind"], "EdgePipeline");
    assert_eq!(
        crd["spec"]["names"]["shortNames"],
        serde_json::json!(["epl"])
    );
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(version["served"], true);
    assert_eq!(version["storage"], true);
    // Without the status subresource the agents' status writes would bump
    // the generation and Argo CD would fight them.
    assert_eq!(version["subresources"]["status"], serde_json::json!({}));
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for wanted in ["Ready", "Backlog", "Age"] {
        assert!(
            columns.contains(&wanted),
            "no {wanted} column in {columns:?}"
        );
    }
}

#[test]
fn spec_schema_is_the_agent_configuration() {
    let schema = edgefleet_fleet::openapi_schema();
    let spec = &schema["properties"]["spec"];
    let required: Vec<&str> = spec["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(required, ["uplink"]);
    for field in ["agent", "sources", "buffer", "uplink", "metrics"] {
        assert!(
            spec["properties"].get(field).is_some(),
            "spec.{field} missing"
        );
    }
    let status = &schema["properties"]["status"]["properties"];
    assert_eq!(status["conditions"]["x-kubernetes-list-type"], "map");
    assert_eq!(
        status["conditions"]["x-kubernetes-list-map-keys"],
        serde_json::json!(["type"])
    );
    assert_eq!(
        status["nodes"]["x-kubernetes-list-map-keys"],
        serde_json::json!(["node"])
    );
    for field in [
        "observedGeneration",
        "backlog",
        "lastAckedTime",
        "configHash",
        "sources",
    ] {
        assert!(status.get(field).is_some(), "status.{field} missing");
    }
}

/// The API server refuses CRDs whose schema is not structural; these are
/// the rules a derive could break: every node has a type (unless it is
/// int-or-string or preserves unknown fields), no `$ref`, no
/// `additionalProperties` beside `properties`, and `anyOf`/`oneOf` only as
/// value validation, without types except the int-or-string pattern
/// `anyOf: [{type: integer}, {type: string}]` (checked against a real
/// apiextensions-apiserver with scripts/k8s-apiserver.sh).
#[test]
fn schema_is_structural() {
    fn walk(node: &Value, path: &str, problems: &mut Vec<String>) {
        let Some(map) = node.as_object() else { return };
        let int_or_string = map.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
        let preserve = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
        if map.contains_key("$ref") {
            problems.push(format!("{path}: $ref"));
        }
        if !map.contains_key("type") && !int_or_string && !preserve {
            problems.push(format!("{path}: no type"));
        }
        if map.contains_key("properties") && map.contains_key("additionalProperties") {
            problems.push(format!("{path}: properties and additionalProperties"));
        }
        if let Some(Value::Object(props)) = map.get("properties") {
            for (k, v) in props {
                walk(v, &format!("{path}.{k}"), problems);
            }
        }
        if let Some(items) = map.get("items") {
            walk(items, &format!("{path}[]"), problems);
        }
        if let Some(Value::Object(_)) = map.get("additionalProperties") {
            walk(
                &map["additionalProperties"],
                &format!("{path}{{}}"),
                problems,
            );
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            if let Some(Value::Array(branches)) = map.get(key) {
                // The one typed junction the API server admits.
                let int_or_string_pattern = int_or_string
                    && key == "anyOf"
                    && map[key] == serde_json::json!([{"type": "integer"}, {"type": "string"}]);
                for branch in branches {
                    // Branches may only restate value constraints, not
                    // introduce structure (or types) of their own.
                    if branch.get("properties").is_some() || branch.get("items").is_some() {
                        problems.push(format!("{path}: {key} branch with structure"));
                    }
                    if branch.get("type").is_some() && !int_or_string_pattern {
                        problems.push(format!("{path}: {key} branch with a type"));
                    }
                }
            }
        }
    }
    let mut problems = Vec::new();
    walk(&edgefleet_fleet::openapi_schema(), "", &mut problems);
    assert!(
        problems.is_empty(),
        "not structural:\n{}",
        problems.join("\n")
    );
}

/// Sizes (`ByteSize`) are an int-or-string of the one shape the API server
/// admits, with their checks on the field, so the server itself refuses
/// "12 parsecs"; and they are not nullable.
#[test]
fn sizes_are_int_or_string_with_their_checks() {
    let schema = edgefleet_fleet::openapi_schema();
    let spec = &schema["properties"]["spec"]["properties"];
    for size in [
        &spec["buffer"]["properties"]["maxBytes"],
        &spec["uplink"]["properties"]["batch"]["properties"]["maxBytes"],
    ] {
        assert_eq!(size["x-kubernetes-int-or-string"], true, "{size}");
        assert_eq!(
            size["anyOf"],
            serde_json::json!([{"type": "integer"}, {"type": "string"}]),
            "{size}"
        );
        assert!(size["pattern"].is_string(), "{size}");
        assert_eq!(size["minimum"], 0.0, "{size}");
        assert!(size.get("nullable").is_none(), "{size}");
    }
}
