use std::collections::HashSet;

use crate::{AgentConfig, Problem};

impl AgentConfig {
    /// Every semantic problem, each with its field path. Empty when the
    /// configuration can be applied. Files are checked for existence so a
    /// typo in a path is caught before the agent is restarted with it.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut p = |path: String, message: String| problems.push(Problem::at(path, message));

        if self.agent.data_dir.trim().is_empty() {
            p("agent.dataDir".into(), "must not be empty".into());
        }
        if let Some(id) = &self.agent.id {
            if id.is_empty() || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
                p(
                    "agent.id".into(),
                    "must be non-empty, without spaces".into(),
                );
            }
        }

        let mut names = HashSet::new();
        for (i, mqtt) in self.sources.mqtt.iter().enumerate() {
            let at = |field: &str| format!("sources.mqtt[{i}].{field}");
            if !names.insert(mqtt.name.clone()) {
                p(
                    at("name"),
                    format!("source name `{}` is used twice", mqtt.name),
                );
            }
            if mqtt.host.is_empty() {
                p(at("host"), "must not be empty".into());
            }
            if mqtt.client_id.is_empty() {
                p(at("clientId"), "must not be empty".into());
            }
            if mqtt.keep_alive_secs < 5 {
                p(at("keepAliveSecs"), "must be at least 5".into());
            }
            if mqtt.password_file.is_some() && mqtt.username.is_none() {
                p(at("passwordFile"), "needs `username` as well".into());
            }
            if let Some(tls) = &mqtt.tls {
                file_exists(&mut p, at("tls.caFile"), &tls.ca_file);
                match (&tls.cert_file, &tls.key_file) {
                    (Some(cert), Some(key)) => {
                        file_exists(&mut p, at("tls.certFile"), cert);
                        file_exists(&mut p, at("tls.keyFile"), key);
                    }
                    (None, None) => {}
                    _ => p(at("tls"), "certFile and keyFile go together".into()),
                }
            }
            if let Some(group) = &mqtt.shared_group {
                if group.is_empty() || group.contains(['/', '+', '#']) {
                    p(
                        at("sharedGroup"),
                        format!("`{group}`: must be non-empty, without `/`, `+` or `#`"),
                    );
                }
            }
            if mqtt.subscriptions.is_empty() {
                p(
                    at("subscriptions"),
                    "needs at least one subscription".into(),
                );
            }
            for (j, sub) in mqtt.subscriptions.iter().enumerate() {
                let at = |field: &str| format!("sources.mqtt[{i}].subscriptions[{j}].{field}");
                if let Err(e) = check_topic_filter(&sub.topic) {
                    p(at("topic"), e);
                }
                if sub.topic.starts_with("$share/") {
                    p(
                        at("topic"),
                        "use the source's `sharedGroup` instead of a `$share/` filter".into(),
                    );
                }
                if sub.qos > 1 {
                    p(
                        at("qos"),
                        format!("{} is not supported: use 0 or 1", sub.qos),
                    );
                }
                if let Some(pattern) = &sub.device_from_topic {
                    if pattern.matches("{device}").count() != 1 {
                        p(
                            at("deviceFromTopic"),
                            "must contain `{device}` exactly once".into(),
                        );
                    }
                }
            }
        }
        for (i, can) in self.sources.can.iter().enumerate() {
            let at = |field: &str| format!("sources.can[{i}].{field}");
            if !names.insert(can.interface.clone()) {
                p(
                    at("interface"),
                    format!("source name `{}` is used twice", can.interface),
                );
            }
            if can.interface.is_empty() || can.interface.len() > 15 {
                p(
                    at("interface"),
                    "must be a Linux interface name (1-15 characters)".into(),
                );
            }
            for (j, dbc) in can.dbc.iter().enumerate() {
                file_exists(&mut p, format!("sources.can[{i}].dbc[{j}]"), dbc);
            }
            for (j, filter) in can.filters.iter().enumerate() {
                let limit = if filter.extended { 0x1FFF_FFFF } else { 0x7FF };
                if filter.id > limit {
                    p(
                        format!("sources.can[{i}].filters[{j}].id"),
                        format!(
                            "{:#x} does not fit a {} id",
                            filter.id,
                            if filter.extended { "29-bit" } else { "11-bit" }
                        ),
                    );
                }
            }
            check_reduction(
                &mut p,
                &format!("sources.can[{i}].reduction"),
                &can.reduction,
            );
        }
        for (i, replay) in self.sources.candump_replay.iter().enumerate() {
            let at = |field: &str| format!("sources.candumpReplay[{i}].{field}");
            file_exists(&mut p, at("file"), &replay.file);
            for (j, dbc) in replay.dbc.iter().enumerate() {
                file_exists(&mut p, format!("sources.candumpReplay[{i}].dbc[{j}]"), dbc);
            }
            if !(replay.speed >= 0.0 && replay.speed.is_finite()) {
                p(
                    at("speed"),
                    "must be 0 (as fast as possible) or a positive factor".into(),
                );
            }
            check_reduction(
                &mut p,
                &format!("sources.candumpReplay[{i}].reduction"),
                &replay.reduction,
            );
        }

        if self.buffer.max_bytes.0 < 1 << 20 {
            p("buffer.maxBytes".into(), "must be at least 1MiB".into());
        }
        if self.buffer.flush.max_batch_records == 0 {
            p(
                "buffer.flush.maxBatchRecords".into(),
                "must be at least 1".into(),
            );
        }
        if self.buffer.flush.max_delay_ms > 1_000 {
            p(
                "buffer.flush.maxDelayMs".into(),
                "must be at most 1000".into(),
            );
        }

        let up = &self.uplink;
        if !up.endpoint.starts_with("https://") {
            p(
                "uplink.endpoint".into(),
                format!("`{}` must be an https:// URL such as https://ingest:7443 (the uplink always uses mutual TLS)", up.endpoint),
            );
        }
        file_exists(&mut p, "uplink.caFile".into(), &up.ca_file);
        file_exists(&mut p, "uplink.certFile".into(), &up.cert_file);
        file_exists(&mut p, "uplink.keyFile".into(), &up.key_file);
        if up.batch.max_records == 0 {
            p(
                "uplink.batch.maxRecords".into(),
                "must be at least 1".into(),
            );
        }
        if up.batch.max_bytes.0 < 1024 || up.batch.max_bytes.0 > 16 << 20 {
            p(
                "uplink.batch.maxBytes".into(),
                "must be between 1KiB and 16MiB".into(),
            );
        }
        if up.backoff.initial_ms == 0 || up.backoff.initial_ms > up.backoff.max_ms {
            p(
                "uplink.backoff".into(),
                "initialMs must be positive and not above maxMs".into(),
            );
        }
        if up.ack_timeout_ms < 1_000 {
            p("uplink.ackTimeoutMs".into(), "must be at least 1000".into());
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            p(
                "metrics.listen".into(),
                format!(
                    "`{}` is not an address such as 127.0.0.1:9464",
                    self.metrics.listen
                ),
            );
        }
        problems
    }
}

fn file_exists(p: &mut impl FnMut(String, String), path: String, file: &str) {
    if file.is_empty() {
        p(path, "must name a file".into());
    } else if !std::path::Path::new(file).is_file() {
        p(path, format!("file `{file}` does not exist"));
    }
}

fn check_reduction(p: &mut impl FnMut(String, String), path: &str, reduction: &crate::Reduction) {
    let rules = std::iter::once(("default".to_string(), &reduction.default)).chain(
        reduction
            .signals
            .iter()
            .map(|(k, v)| (format!("signals.{k}"), v)),
    );
    for (name, rule) in rules {
        if let Some(deadband) = rule.deadband {
            if !(deadband >= 0.0 && deadband.is_finite()) {
                p(
                    format!("{path}.{name}.deadband"),
                    "must be a non-negative number".into(),
                );
            }
        }
    }
}

/// MQTT topic filter rules (MQTT 3.1.1 §4.7): `#` only last and alone in its
/// level, `+` alone in its level.
fn check_topic_filter(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("must not be empty".into());
    }
    let levels: Vec<&str> = topic.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
            return Err(format!("`{topic}`: `#` must be the whole last level"));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!("`{topic}`: `+` must be a whole level"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::parse_str;

    fn uplink(dir: &std::path::Path) -> String {
        for f in ["ca.pem", "agent.pem", "agent.key"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        format!(
            "uplink:\n  endpoint: https://127.0.0.1:7443\n  caFile: {d}/ca.pem\n  certFile: {d}/agent.pem\n  keyFile: {d}/agent.key\n",
            d = dir.display()
        )
    }

    #[test]
    fn a_minimal_config_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "{}sources:\n  mqtt:\n    - host: 127.0.0.1\n      clientId: a1\n      subscriptions:\n        - topic: devices/+/telemetry\n          deviceFromTopic: devices/{{device}}/telemetry\n",
            uplink(dir.path())
        );
        let config = parse_str(&text, "test.yaml").unwrap();
        assert_eq!(config.sources.mqtt[0].subscriptions[0].qos, 1);
        assert_eq!(config.buffer.max_bytes.0, 1 << 30);
    }

    #[test]
    fn every_semantic_problem_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "{}buffer:\n  maxBytes: 10KiB\nsources:\n  mqtt:\n    - host: ''\n      clientId: a1\n      subscriptions:\n        - topic: a/#/b\n          qos: 2\n",
            uplink(dir.path())
        );
        let err = parse_str(&text, "test.yaml").unwrap_err();
        let paths: Vec<&str> = err.problems().iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "sources.mqtt[0].host",
                "sources.mqtt[0].subscriptions[0].topic",
                "sources.mqtt[0].subscriptions[0].qos",
                "buffer.maxBytes"
            ]
        );
    }

    #[test]
    fn type_errors_carry_line_and_every_section_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "{}buffer:\n  whenFull: sometimes\nmetrics:\n  lisen: 1\n",
            uplink(dir.path())
        );
        let err = parse_str(&text, "test.yaml").unwrap_err();
        let problems = err.problems();
        assert_eq!(problems[0].path, "buffer.whenFull");
        assert_eq!(problems[0].line, Some(7));
        assert!(
            !problems[0].message.contains("buffer.whenFull"),
            "path said once: {}",
            problems[0]
        );
        assert!(
            problems[0].message.contains("unknown variant `sometimes`"),
            "{}",
            problems[0]
        );
        assert!(
            problems
                .iter()
                .any(|p| p.path == "metrics.lisen" && p.message.contains("unknown field")),
            "{err}"
        );
    }

    #[test]
    fn hash_ignores_formatting() {
        let dir = tempfile::tempdir().unwrap();
        let a = parse_str(&uplink(dir.path()), "a").unwrap();
        let b = parse_str(&uplink(dir.path()).replace("  ", "    "), "b").unwrap();
        assert_eq!(a.hash(), b.hash());
    }
}
