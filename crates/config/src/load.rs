use std::fmt;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

use crate::AgentConfig;

/// One thing wrong with a configuration, located as precisely as we can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted field path, e.g. `sources.mqtt[0].subscriptions[1].qos`; empty for the document.
    pub path: String,
    pub message: String,
    /// 1-based line and column in the file, for syntax and type errors.
    pub line: Option<usize>,
    pub column: Option<usize>,
}

impl Problem {
    pub fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
            line: None,
            column: None,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let (Some(line), Some(column)) = (self.line, self.column) {
            write!(f, "line {line}, column {column}: ")?;
        }
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: {} problem(s):\n{}", problems.len(), render(problems))]
    Invalid {
        origin: String,
        problems: Vec<Problem>,
    },
}

fn render(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { problems, .. } => problems,
        }
    }
}

/// Reads, parses and validates a config file.
pub fn load_file(path: &Path) -> Result<AgentConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_str(&text, &path.display().to_string())
}

/// Parses and validates a config document; `origin` names it in errors.
pub fn parse_str(text: &str, origin: &str) -> Result<AgentConfig, ConfigError> {
    let invalid = |problems| ConfigError::Invalid {
        origin: origin.to_string(),
        problems,
    };
    let deserializer = serde_yaml_ng::Deserializer::from_str(text);
    match serde_path_to_error::deserialize::<_, AgentConfig>(deserializer) {
        Ok(config) => {
            let problems = config.validate();
            if problems.is_empty() {
                Ok(config)
            } else {
                Err(invalid(problems))
            }
        }
        Err(err) => {
            let path = clean_path(&err.path().to_string());
            let inner = err.into_inner();
            let location = inner.location();
            // serde_yaml_ng prefixes its message with the path we report
            // on our own.
            let message = strip_location(&inner.to_string());
            let message = message
                .strip_prefix(&format!("{path}: "))
                .map(str::to_string)
                .unwrap_or(message);
            let first = Problem {
                path,
                message,
                line: location.as_ref().map(|l| l.line()),
                column: location.as_ref().map(|l| l.column()),
            };
            let mut problems = vec![first];
            // serde stops at the first error; look at each section on its own
            // so the user sees every broken field in one run.
            if let Ok(document) = serde_yaml_ng::from_str::<Value>(text) {
                for extra in section_problems(&document) {
                    if !problems.iter().any(|p| p.path == extra.path) {
                        problems.push(extra);
                    }
                }
            }
            Err(invalid(problems))
        }
    }
}

fn section_problems(document: &Value) -> Vec<Problem> {
    let mut problems = Vec::new();
    let Value::Mapping(top) = document else {
        return problems;
    };
    for (key, value) in top {
        let Some(key) = key.as_str() else { continue };
        match key {
            "agent" => check::<crate::AgentSection>(value, "agent", &mut problems),
            "buffer" => check::<crate::BufferConfig>(value, "buffer", &mut problems),
            "uplink" => check::<crate::UplinkConfig>(value, "uplink", &mut problems),
            "metrics" => check::<crate::MetricsConfig>(value, "metrics", &mut problems),
            "sources" => {
                let Value::Mapping(sources) = value else {
                    continue;
                };
                for (kind, list) in sources {
                    let (Some(kind), Value::Sequence(items)) = (kind.as_str(), list) else {
                        continue;
                    };
                    for (i, item) in items.iter().enumerate() {
                        let path = format!("sources.{kind}[{i}]");
                        match kind {
                            "mqtt" => check::<crate::MqttSource>(item, &path, &mut problems),
                            "can" => check::<crate::CanSource>(item, &path, &mut problems),
                            "candumpReplay" => {
                                check::<crate::CandumpReplaySource>(item, &path, &mut problems)
                            }
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    problems
}

fn check<T: DeserializeOwned>(value: &Value, prefix: &str, problems: &mut Vec<Problem>) {
    if let Err(err) = serde_path_to_error::deserialize::<_, T>(value.clone()) {
        let inner_path = clean_path(&err.path().to_string());
        let path = if inner_path.is_empty() {
            prefix.to_string()
        } else {
            format!("{prefix}.{inner_path}")
        };
        problems.push(Problem::at(
            path,
            strip_location(&err.into_inner().to_string()),
        ));
    }
}

/// serde_path_to_error prints `.` for the root and `?` for untracked parts.
fn clean_path(path: &str) -> String {
    if path == "." {
        String::new()
    } else {
        path.to_string()
    }
}

/// The YAML error text repeats the location we report separately.
fn strip_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(at) => message[..at].to_string(),
        None => message.to_string(),
    }
}
