use std::path::PathBuf;

/// Everything the fleet tooling can refuse or fail at. Messages are written
/// for the person at the command line.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("invalid site name `{name}`: {reason}")]
    InvalidSiteName { name: String, reason: String },
    #[error("invalid label `{key}={value}`: {reason}")]
    InvalidLabel {
        key: String,
        value: String,
        reason: String,
    },
    #[error("site `{name}` already exists at {}; remove it first to scaffold it anew", path.display())]
    SiteExists { name: String, path: PathBuf },
    #[error("{} is not an edgefleet repository: {missing} is missing", root.display())]
    NotARepository { root: PathBuf, missing: String },
    #[error("invalid site option: {0}")]
    InvalidOption(String),
    #[error("the generated pipeline for site `{name}` is invalid:\n{problems}")]
    InvalidPipeline { name: String, problems: String },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("YAML: {0}")]
    Yaml(#[source] serde_yaml_ng::Error),
}
