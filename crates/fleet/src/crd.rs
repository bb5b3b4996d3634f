//! The `CustomResourceDefinition` of [`EdgePipeline`], as committed under
//! `deploy/k3s/crd/`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::{Map, Value};

use crate::{EdgePipeline, FleetError};

/// Where the generated CRD is committed, relative to the repository root.
pub const CRD_PATH: &str = "deploy/k3s/crd/edgepipelines.edgefleet.io.yaml";

/// The first lines of the committed file, so nobody edits it by hand.
const HEADER: &str = "\
# Generated from crates/fleet (edgefleet_fleet::crd_yaml): do not edit.
# Regenerate with: EDGEFLEET_BLESS=1 cargo test -p edgefleet-fleet --test crd
";

/// The CRD, with the labels Argo CD and people use to find edgefleet objects.
pub fn crd() -> CustomResourceDefinition {
    let mut crd = EdgePipeline::crd();
    crd.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("app.kubernetes.io/part-of".into(), "edgefleet".into());
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            let mut value = serde_json::to_value(&*schema).expect("a schema serialises");
            repair_int_or_string(&mut value);
            *schema = serde_json::from_value(value).expect("a repaired schema deserialises");
        }
    }
    crd
}

/// kube's schema rewriting, written for `Option<Quantity>`-like fields, harms
/// sizes such as `buffer.maxBytes` (`ByteSize`: a number or "64MiB"):
/// - it strips `type` from the `anyOf` branches, leaving `{minimum: 0}` and
///   `{pattern: ...}`; a string then passes the first branch (minimum does not
///   apply to strings), so the API server would accept "12 parsecs";
/// - it marks every non-required int-or-string property `nullable`, though
///   these always have a default and `null` is not a size to the agent.
///
/// The only `anyOf` an API server admits under int-or-string is exactly
/// `[{type: integer}, {type: string}]` (typed branches with more in them are
/// refused as not structural: scripts/k8s-apiserver.sh found out). So the
/// branches' checks move up to the field itself, where each applies only to
/// values of its own type (`minimum` to numbers, `pattern` to strings), and
/// `nullable` goes where a non-null default shows the field is not optional.
fn repair_int_or_string(node: &mut Value) {
    match node {
        Value::Object(map) => {
            if map.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
                hoist_branch_checks(map);
                if map.get("default").is_some_and(|d| !d.is_null()) {
                    map.remove("nullable");
                }
            }
            for child in map.values_mut() {
                repair_int_or_string(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(repair_int_or_string),
        _ => {}
    }
}

fn hoist_branch_checks(map: &mut Map<String, Value>) {
    let Some(Value::Array(branches)) = map.get("anyOf") else {
        return;
    };
    let mut hoisted = Map::new();
    for branch in branches {
        let Value::Object(branch) = branch else {
            return;
        };
        for (key, value) in branch {
            if key == "type" {
                continue;
            }
            // The same keyword in both branches (or already on the field)
            // cannot be merged without changing its meaning: leave it be.
            if hoisted.contains_key(key) || map.contains_key(key) {
                return;
            }
            hoisted.insert(key.clone(), value.clone());
        }
    }
    map.extend(hoisted);
    map.insert(
        "anyOf".into(),
        serde_json::json!([{"type": "integer"}, {"type": "string"}]),
    );
}

/// The CRD as YAML, in a stable form: keys sorted at every level, so the
/// output does not depend on whether some other crate in the build turned on
/// serde_json's `preserve_order` (which would make the committed-file check
/// flap between a workspace build and a build of this crate alone).
pub fn crd_yaml() -> Result<String, FleetError> {
    let value = serde_json::to_value(crd()).map_err(FleetError::Json)?;
    let yaml = serde_yaml_ng::to_string(&sorted(value)).map_err(FleetError::Yaml)?;
    Ok(format!("{HEADER}{yaml}"))
}

/// The `openAPIV3Schema` of the served version, as JSON.
pub fn openapi_schema() -> Value {
    let crd = crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("the derive always emits a schema");
    serde_json::to_value(schema).expect("a schema serialises")
}

fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let mut out = Map::new();
            for (k, v) in entries {
                out.insert(k, sorted(v));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}
