//! From an `EdgePipeline` object to the configuration the agent runs.

use edgefleet_config::{AgentConfig, ConfigError};
use serde_json::Value;

/// Why a spec cannot run, in one line for a status message (every problem,
/// with its field path under `spec`).
pub fn refusal_message(error: &ConfigError) -> String {
    match error {
        ConfigError::Invalid { problems, .. } => problems
            .iter()
            // Line and column would point into the JSON the agent rendered,
            // not into anything the user wrote: the field path says where.
            .map(|p| {
                if p.path.is_empty() {
                    p.message.clone()
                } else {
                    format!("spec.{}: {}", p.path, p.message)
                }
            })
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}

/// Parses and validates an object's `spec` exactly as the agent validates its
/// configuration file (field types, semantic checks, and that the files it
/// names — certificates, DBC files — exist on this node). `origin` names the
/// object in log messages.
pub fn config_from_spec(spec: Option<&Value>, origin: &str) -> Result<AgentConfig, String> {
    let spec = match spec {
        Some(spec) if !spec.is_null() => spec,
        _ => return Err("the EdgePipeline has no spec".into()),
    };
    // JSON is YAML: the configuration loader reports field paths and
    // collects every problem, which a plain serde_json parse would not.
    let text = serde_json::to_string_pretty(spec).map_err(|e| e.to_string())?;
    edgefleet_config::parse_str(&text, origin).map_err(|e| refusal_message(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn files() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        for name in ["ca.pem", "agent.pem", "agent.key"] {
            std::fs::write(dir.path().join(name), "x").unwrap();
        }
        let d = dir.path().display().to_string();
        (dir, d)
    }

    #[test]
    fn a_valid_spec_becomes_the_configuration() {
        let (_dir, d) = files();
        let spec = json!({
            "uplink": {
                "endpoint": "https://127.0.0.1:7443",
                "caFile": format!("{d}/ca.pem"),
                "certFile": format!("{d}/agent.pem"),
                "keyFile": format!("{d}/agent.key"),
            },
            "buffer": {"maxBytes": "64MiB"},
        });
        let config = config_from_spec(Some(&spec), "test").unwrap();
        assert_eq!(config.buffer.max_bytes.0, 64 << 20);
    }

    #[test]
    fn every_problem_is_reported_with_its_path_under_spec() {
        let (_dir, d) = files();
        let spec = json!({
            "uplink": {
                "endpoint": "https://127.0.0.1:7443",
                "caFile": format!("{d}/missing-ca.pem"),
                "certFile": format!("{d}/agent.pem"),
                "keyFile": format!("{d}/agent.key"),
            },
            "sources": {"mqtt": [{"host": "", "clientId": "a", "subscriptions": [{"topic": "a/#/b"}]}]},
        });
        let message = config_from_spec(Some(&spec), "test").unwrap_err();
        assert!(message.contains("spec.uplink.caFile: file"), "{message}");
        assert!(message.contains("missing-ca.pem"), "{message}");
        assert!(message.contains("spec.sources.mqtt[0].host"), "{message}");
        assert!(!message.contains("line "), "{message}");
    }

    #[test]
    fn unknown_fields_and_a_missing_spec_are_refused() {
        let spec = json!({"uplinc": {}});
        let message = config_from_spec(Some(&spec), "test").unwrap_err();
        assert!(message.contains("uplinc"), "{message}");
        assert_eq!(
            config_from_spec(None, "test").unwrap_err(),
            "the EdgePipeline has no spec"
        );
    }
}
