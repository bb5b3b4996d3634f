//! Logging set-up shared by the binaries.

use tracing_subscriber::filter::{LevelFilter, Targets};

/// Text or JSON logs on stderr, filtered by `RUST_LOG` (default `info`).
///
/// `RUST_LOG` takes a default level and per-target levels, such as
/// `warn,edge_agent::uplink=debug`. It is parsed as `Targets` rather than
/// `EnvFilter`: the agent needs no span or field filters, and `EnvFilter`
/// brings a regex engine that is a quarter of a MiB of the shipped
/// binary's resident code on a gateway (BENCHMARKS.md, "Memory").
pub fn init_logging(json: bool) {
    use tracing_subscriber::{fmt, prelude::*};
    let (filter, problem) = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let text = (!json).then(|| fmt::layer().with_writer(std::io::stderr));
    let json = json.then(|| {
        fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .try_init();
    if let Some(problem) = problem {
        tracing::error!("{problem}; logging at info");
    }
}

/// The filter for a `RUST_LOG` value, and what is wrong with the value if
/// it cannot be used (the default, `info`, is then used).
pub fn log_filter(value: Option<&str>) -> (Targets, Option<String>) {
    let default = || Targets::new().with_default(LevelFilter::INFO);
    match value.map(str::trim) {
        None | Some("") => (default(), None),
        Some(value) => match value.parse::<Targets>() {
            Ok(targets) => (targets, None),
            Err(e) => (
                default(),
                Some(format!(
                    "RUST_LOG={value:?} is not a list of levels and target=level pairs: {e}"
                )),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn rust_log_sets_a_default_and_per_target_levels() {
        let (filter, problem) = log_filter(Some("warn,edge_agent::uplink=debug"));
        assert_eq!(problem, None);
        assert!(filter.would_enable("edge_agent::uplink", &Level::DEBUG));
        assert!(!filter.would_enable("edge_agent::uplink", &Level::TRACE));
        assert!(filter.would_enable("sled", &Level::WARN));
        assert!(!filter.would_enable("sled", &Level::INFO));
    }

    #[test]
    fn no_rust_log_means_info() {
        let (filter, problem) = log_filter(None);
        assert_eq!(problem, None);
        assert!(filter.would_enable("edge_agent", &Level::INFO));
        assert!(!filter.would_enable("edge_agent", &Level::DEBUG));
    }

    #[test]
    fn a_malformed_rust_log_is_reported_and_info_is_used() {
        let (filter, problem) = log_filter(Some("edge_agent=loud"));
        let problem = problem.expect("a problem");
        assert!(problem.contains("edge_agent=loud"), "{problem}");
        assert!(filter.would_enable("edge_agent", &Level::INFO));
        assert!(!filter.would_enable("edge_agent", &Level::DEBUG));
    }
}
