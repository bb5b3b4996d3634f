//! The last configuration applied from the `EdgePipeline`, kept on the node
//! so that an agent restarting while the API server is unreachable (the
//! site's control plane down, the node cut off) starts collecting at once
//! with it instead of waiting for the cluster.

use std::io::Write;
use std::path::Path;

use edgefleet_config::AgentConfig;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Cached {
    namespace: String,
    name: String,
    generation: i64,
    spec: serde_json::Value,
}

/// Writes the cache atomically (temporary file, fsync, rename).
pub fn save(
    path: &Path,
    namespace: &str,
    name: &str,
    generation: i64,
    config: &AgentConfig,
) -> std::io::Result<()> {
    let cached = Cached {
        namespace: namespace.into(),
        name: name.into(),
        generation,
        spec: serde_json::to_value(config).map_err(std::io::Error::other)?,
    };
    let text = serde_json::to_vec_pretty(&cached).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp");
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&text)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// The cached generation and configuration of pipeline `namespace/name`, if
/// the cache exists, belongs to that pipeline and is still valid on this
/// node (its files exist); why not otherwise.
pub fn load(path: &Path, namespace: &str, name: &str) -> Result<(i64, AgentConfig), String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let cached: Cached = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    if cached.namespace != namespace || cached.name != name {
        return Err(format!(
            "it holds EdgePipeline {}/{}",
            cached.namespace, cached.name
        ));
    }
    let origin = format!(
        "{} (cached generation {})",
        path.display(),
        cached.generation
    );
    let config = super::spec::config_from_spec(Some(&cached.spec), &origin)?;
    Ok((cached.generation, config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_configuration_loads_back_with_the_same_hash() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        for name in ["ca.pem", "agent.pem", "agent.key"] {
            std::fs::write(dir.path().join(name), "x").unwrap();
        }
        let config = edgefleet_config::parse_str(
            &format!("uplink:\n  endpoint: https://127.0.0.1:7443\n  caFile: {d}/ca.pem\n  certFile: {d}/agent.pem\n  keyFile: {d}/agent.key\n"),
            "test",
        )
        .unwrap();
        let path = dir.path().join("pipeline.json");
        save(&path, "edgefleet", "edge-agent", 7, &config).unwrap();
        let (generation, loaded) = load(&path, "edgefleet", "edge-agent").unwrap();
        assert_eq!(generation, 7);
        assert_eq!(loaded.hash(), config.hash());
        let other = load(&path, "edgefleet", "other").unwrap_err();
        assert!(other.contains("edgefleet/edge-agent"), "{other}");
        std::fs::remove_file(dir.path().join("ca.pem")).unwrap();
        let invalid = load(&path, "edgefleet", "edge-agent").unwrap_err();
        assert!(invalid.contains("spec.uplink.caFile"), "{invalid}");
    }
}
