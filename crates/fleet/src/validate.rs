//! Checks `EdgePipeline` manifests before they reach a cluster.
//!
//! Three layers, each catching what the one before cannot:
//! 1. the CRD's `openAPIV3Schema`, made strict the way `kubectl apply`'s
//!    default server-side field validation is (an unknown field is an error,
//!    where the bare schema would silently prune it);
//! 2. a typed parse into [`EdgePipeline`], the same the agent will do;
//! 3. the agent configuration's own semantic checks (topic filters, QoS,
//!    interface names...), minus the check that files exist: the paths
//!    name files on the gateway (mounted Secret and ConfigMap), not here.

use serde_json::Value;

use crate::{EdgePipelineStatus, FleetError, GROUP, VERSION};

/// Validates `EdgePipeline` documents against a CRD schema.
pub struct PipelineValidator {
    schema: jsonschema::Validator,
}

impl Default for PipelineValidator {
    fn default() -> Self {
        Self::new()
    }
}

impl PipelineValidator {
    /// With the schema this crate generates.
    pub fn new() -> Self {
        Self::from_schema(&crate::openapi_schema()).expect("the generated schema compiles")
    }

    /// With the schema of a CRD manifest, e.g. the committed
    /// `deploy/k3s/crd/edgepipelines.edgefleet.io.yaml`.
    pub fn from_crd_yaml(text: &str) -> Result<Self, FleetError> {
        let crd: Value = serde_yaml_ng::from_str(text).map_err(FleetError::Yaml)?;
        let schema = crd
            .pointer("/spec/versions")
            .and_then(Value::as_array)
            .and_then(|versions| {
                versions
                    .iter()
                    .find(|v| v.get("name").and_then(Value::as_str) == Some(VERSION))
            })
            .and_then(|v| v.pointer("/schema/openAPIV3Schema"))
            .ok_or_else(|| {
                FleetError::InvalidOption(format!(
                    "the CRD has no openAPIV3Schema for version {VERSION}"
                ))
            })?;
        Self::from_schema(schema)
    }

    fn from_schema(schema: &Value) -> Result<Self, FleetError> {
        let strict = strict_schema(schema.clone());
        // OpenAPI v3.0 schemas are JSON Schema draft 4 in their keywords
        // (boolean exclusiveMinimum and the like).
        let schema = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft4)
            .build(&strict)
            .map_err(|e| {
                FleetError::InvalidOption(format!("the CRD schema does not compile: {e}"))
            })?;
        Ok(Self { schema })
    }

    /// Every problem with one document; empty when it would be accepted.
    pub fn check(&self, document: &Value) -> Vec<String> {
        let mut problems = Vec::new();
        let api_version = document.get("apiVersion").and_then(Value::as_str);
        let kind = document.get("kind").and_then(Value::as_str);
        if api_version != Some(&format!("{GROUP}/{VERSION}")) || kind != Some("EdgePipeline") {
            problems.push(format!(
                "not an EdgePipeline: apiVersion {api_version:?}, kind {kind:?} (expected {GROUP}/{VERSION}, EdgePipeline)"
            ));
            return problems;
        }
        match document.pointer("/metadata/name").and_then(Value::as_str) {
            Some(name) if is_dns_subdomain(name) => {}
            Some(name) => problems.push(format!(
                "metadata.name `{name}` is not a DNS-1123 subdomain"
            )),
            None => problems.push("metadata.name is missing".into()),
        }
        for error in self.schema.iter_errors(document) {
            let path = error.instance_path().to_string();
            let path = if path.is_empty() {
                "/".to_string()
            } else {
                path
            };
            problems.push(format!("{path}: {error}"));
        }
        if !problems.is_empty() {
            // The typed parse would only repeat the schema's complaints.
            return problems;
        }
        // The spec through the agent's own loader, which names the field of
        // each problem.
        let spec_yaml = match serde_yaml_ng::to_string(&document["spec"]) {
            Ok(text) => text,
            Err(e) => {
                problems.push(format!("spec does not serialise: {e}"));
                return problems;
            }
        };
        if let Err(err) = edgefleet_config::parse_str(&spec_yaml, "spec") {
            problems.extend(
                err.problems()
                    .iter()
                    // Node-local paths: they exist on the gateway, not here.
                    .filter(|p| !p.message.contains("does not exist"))
                    .map(|p| format!("spec.{}: {}", p.path, p.message)),
            );
        }
        if let Some(status) = document.get("status") {
            if let Err(e) = serde_json::from_value::<EdgePipelineStatus>(status.clone()) {
                problems.push(format!("status does not parse: {e}"));
            }
        }
        problems
    }

    /// Checks every document of a YAML stream that is an `EdgePipeline`
    /// (others are skipped); problems are prefixed with the document's name.
    pub fn check_yaml(&self, text: &str) -> Vec<String> {
        let mut problems = Vec::new();
        for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let value: Value = match serde::Deserialize::deserialize(document) {
                Ok(v) => v,
                Err(e) => {
                    problems.push(format!("document {index}: not YAML: {e}"));
                    continue;
                }
            };
            if value.is_null() || value.get("kind").and_then(Value::as_str) != Some("EdgePipeline")
            {
                continue;
            }
            let name = format!(
                "{}/{}",
                value
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or("-"),
                value
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
            );
            problems.extend(
                self.check(&value)
                    .into_iter()
                    .map(|p| format!("EdgePipeline {name}: {p}")),
            );
        }
        problems
    }
}

/// Turns a CRD schema into the JSON Schema the API server effectively
/// enforces with strict field validation:
/// - objects that list `properties` reject other fields, except where the
///   schema says `x-kubernetes-preserve-unknown-fields`, and except
///   `metadata`, which the API server validates by its own rules;
/// - the root admits `apiVersion`, `kind` and `metadata`;
/// - `nullable: true` admits `null`, which plain JSON Schema does not know.
fn strict_schema(schema: Value) -> Value {
    fn walk(mut node: Value, is_metadata: bool) -> Value {
        let Value::Object(map) = &mut node else {
            return node;
        };
        if map.get("nullable") == Some(&Value::Bool(true)) {
            if let Some(Value::String(t)) = map.get("type").cloned() {
                map.insert(
                    "type".into(),
                    Value::Array(vec![Value::String(t), "null".into()]),
                );
            }
        }
        let preserve = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
        if let Some(Value::Object(props)) = map.get_mut("properties") {
            let keys: Vec<String> = props.keys().cloned().collect();
            for key in keys {
                let child = props.remove(&key).expect("key just listed");
                let child = walk(child, key == "metadata");
                props.insert(key, child);
            }
            if !preserve && !is_metadata && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
        }
        for key in ["items", "additionalProperties", "not"] {
            if let Some(child) = map.remove(key) {
                map.insert(key.into(), walk(child, false));
            }
        }
        for key in ["anyOf", "allOf", "oneOf"] {
            if let Some(Value::Array(children)) = map.remove(key) {
                let children = children.into_iter().map(|c| walk(c, false)).collect();
                map.insert(key.into(), Value::Array(children));
            }
        }
        node
    }
    let mut strict = walk(schema, false);
    // The API server adds these to every custom resource's schema; the CRD
    // leaves them out.
    if let Some(Value::Object(props)) = strict.get_mut("properties") {
        for (key, kind) in [
            ("apiVersion", "string"),
            ("kind", "string"),
            ("metadata", "object"),
        ] {
            props
                .entry(key)
                .or_insert_with(|| serde_json::json!({ "type": kind }));
        }
    }
    strict
}

fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

/// Checks a rendered site (the output of `kubectl kustomize
/// gitops/sites/<name>`) for references that would silently not resolve:
/// every ConfigMap a workload mounts must be in the render, except an
/// optional one of which no generated (hash-suffixed) variant exists either.
/// A generated ConfigMap the workload still names without its hash means
/// kustomize did not rewrite the reference.
pub fn check_site_render(text: &str) -> Vec<String> {
    let mut documents = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        match <Value as serde::Deserialize>::deserialize(document) {
            Ok(Value::Null) => {}
            Ok(value) => documents.push(value),
            Err(e) => return vec![format!("not YAML: {e}")],
        }
    }
    let config_maps: Vec<&str> = documents
        .iter()
        .filter(|d| d["kind"] == "ConfigMap")
        .filter_map(|d| d.pointer("/metadata/name").and_then(Value::as_str))
        .collect();
    let mut problems = Vec::new();
    for workload in &documents {
        let Some(volumes) = workload
            .pointer("/spec/template/spec/volumes")
            .and_then(Value::as_array)
        else {
            continue;
        };
        let owner = format!(
            "{} {}",
            workload["kind"].as_str().unwrap_or("?"),
            workload
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("?")
        );
        for volume in volumes {
            let Some(name) = volume.pointer("/configMap/name").and_then(Value::as_str) else {
                continue;
            };
            if config_maps.contains(&name) {
                continue;
            }
            let optional = volume.pointer("/configMap/optional") == Some(&Value::Bool(true));
            let generated = config_maps.iter().find(|cm| {
                cm.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('-'))
            });
            match (optional, generated) {
                (true, None) => {}
                (_, Some(generated)) => problems.push(format!(
                    "{owner} mounts ConfigMap `{name}` but the render has `{generated}`: \
                     kustomize did not rewrite the reference (namespace mismatch?)"
                )),
                (false, None) => problems.push(format!(
                    "{owner} mounts ConfigMap `{name}`, which the render does not contain"
                )),
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::check_site_render;

    const DAEMONSET: &str = "apiVersion: apps/v1
kind: DaemonSet
metadata: {name: edge-agent}
spec:
  template:
    spec:
      volumes:
        - name: dbc
          configMap: {name: NAME, optional: true}
        - name: tls
          secret: {secretName: edge-agent-tls}
";

    fn render(mounted: &str, config_map: Option<&str>) -> String {
        let mut text = DAEMONSET.replace("NAME", mounted);
        if let Some(cm) = config_map {
            text.push_str(&format!(
                "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {cm}}}\n"
            ));
        }
        text
    }

    #[test]
    fn resolved_and_absent_optional_config_maps_pass() {
        assert!(
            check_site_render(&render("edge-agent-dbc-5h2k", Some("edge-agent-dbc-5h2k")))
                .is_empty()
        );
        assert!(check_site_render(&render("edge-agent-dbc", None)).is_empty());
    }

    #[test]
    fn an_unrewritten_generated_name_is_caught() {
        let problems = check_site_render(&render("edge-agent-dbc", Some("edge-agent-dbc-5h2k")));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("did not rewrite"), "{problems:?}");
    }

    #[test]
    fn a_missing_required_config_map_is_caught() {
        let text = render("other", None).replace("optional: true", "optional: false");
        let problems = check_site_render(&text);
        assert!(problems[0].contains("does not contain"), "{problems:?}");
    }
}
