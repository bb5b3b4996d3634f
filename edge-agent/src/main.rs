use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edge_agent::{Agent, ConfigFeed};
use tokio_util::sync::CancellationToken;

/// edgefleet edge agent: reads telemetry from MQTT and CAN, keeps it in a
/// durable buffer, and streams it to cloud-ingest over mutual TLS.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "EDGEFLEET_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent with a configuration file (reloaded when it changes),
    /// or with the spec of an EdgePipeline custom resource (followed live;
    /// the agent's state is written to its status).
    #[command(
        after_help = "Examples:\n  edge-agent run --config /etc/edgefleet/agent.yaml\n  edge-agent run --pipeline edge-agent --namespace edgefleet   # in-cluster credentials or KUBECONFIG"
    )]
    Run {
        /// The configuration file.
        #[arg(
            long,
            short,
            required_unless_present = "pipeline",
            conflicts_with = "pipeline"
        )]
        config: Option<PathBuf>,
        /// Name of the EdgePipeline to follow.
        #[arg(long, value_name = "NAME")]
        pipeline: Option<String>,
        /// Namespace of the EdgePipeline (default: the pod's, or the kubeconfig context's).
        #[arg(long, env = "POD_NAMESPACE")]
        namespace: Option<String>,
        /// This node's name (in a pod, the downward API's spec.nodeName):
        /// keys the agent's entry in an EdgePipeline's status, makes MQTT
        /// client ids unique, and with a site certificate names the stream
        /// (`<node>@<site>`). Default: the host name.
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// Write the status at least this often (and within a second of a change).
        #[arg(long, value_name = "SECONDS", default_value_t = 15,
              value_parser = clap::value_parser!(u64).range(1..=600))]
        status_interval: u64,
        /// Keep the last applied spec in this file and start from it when the
        /// API server cannot be reached.
        #[arg(long, value_name = "FILE")]
        pipeline_cache: Option<PathBuf>,
        /// Threads that run the agent's sources and uplink (the buffer's
        /// writer has its own). One keeps up with a broker at full speed
        /// and spends less CPU per record than two: fewer hand-offs between
        /// threads (BENCHMARKS.md, "One runtime thread").
        #[arg(long, value_name = "N", env = "EDGEFLEET_WORKER_THREADS", default_value_t = 1,
              value_parser = clap::value_parser!(u16).range(1..=256))]
        worker_threads: u16,
    },
    /// Check a configuration file and report every problem with its field path.
    CheckConfig { file: PathBuf },
    /// Decode a `candump -L` log with DBC files: one JSON line per decoded
    /// frame on stdout, one line per undecodable frame and a summary on stderr.
    #[command(
        after_help = "Example:\n  edge-agent decode --dbc vehicle.dbc --dbc body.dbc candump-2025-01-31.log\n\nExit status: 0 when the log was read, 2 when a DBC file does not load\n(the error names the file and line), 1 when the log cannot be read."
    )]
    Decode {
        /// DBC file; repeat for several (a message id may be defined only once).
        #[arg(long = "dbc", value_name = "FILE", required = true)]
        dbc: Vec<PathBuf>,
        /// The candump log (`candump -L` format); `-` reads standard input.
        log: PathBuf,
    },
    /// Print the dead letters (payloads that failed to decode) of a stopped agent.
    DeadLetters {
        /// The agent's data directory (agent.dataDir).
        #[arg(long)]
        data_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    edge_agent::telemetry::init_logging(cli.log_json);
    match cli.command {
        Command::CheckConfig { file } => match edgefleet_config::load_file(&file) {
            Ok(config) => {
                println!("{}: ok (config hash {})", file.display(), config.hash());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Decode { dbc, log } => decode(&dbc, &log),
        Command::DeadLetters { data_dir } => match edgefleet_buffer::read_dead_letters(&data_dir) {
            Ok(letters) => {
                for letter in letters {
                    println!("{}", serde_json::to_string(&letter).unwrap_or_default());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Run {
            config,
            pipeline,
            namespace,
            node_name,
            status_interval,
            pipeline_cache,
            worker_threads,
        } => {
            let feed = match (config, pipeline) {
                (Some(config), _) => Feed::File { config, node_name },
                (None, Some(name)) => Feed::Pipeline {
                    name,
                    namespace,
                    node: node_name.unwrap_or_else(edge_agent::host_name),
                    status_interval: std::time::Duration::from_secs(status_interval),
                    cache_file: pipeline_cache,
                },
                (None, None) => unreachable!("clap requires one of them"),
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(usize::from(worker_threads))
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(async move {
                let shutdown = CancellationToken::new();
                tokio::spawn(stop_on_signal(shutdown.clone()));
                let result = match feed {
                    Feed::File { config, node_name } => {
                        Agent::run_on_node(ConfigFeed::File(config), node_name, shutdown, None)
                            .await
                            .map_err(|e| e.to_string())
                    }
                    Feed::Pipeline { .. } => run_pipeline(feed, shutdown).await,
                };
                match result {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!("{e}");
                        ExitCode::from(2)
                    }
                }
            })
        }
    }
}

// Without the `kubernetes` feature a pipeline is refused before its fields are read.
#[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
enum Feed {
    File {
        config: PathBuf,
        node_name: Option<String>,
    },
    Pipeline {
        name: String,
        namespace: Option<String>,
        node: String,
        status_interval: std::time::Duration,
        cache_file: Option<PathBuf>,
    },
}

#[cfg(feature = "kubernetes")]
async fn run_pipeline(feed: Feed, shutdown: CancellationToken) -> Result<(), String> {
    let Feed::Pipeline {
        name,
        namespace,
        node,
        status_interval,
        cache_file,
    } = feed
    else {
        unreachable!("called for pipelines only")
    };
    let options = edge_agent::pipeline::PipelineOptions {
        name,
        namespace,
        node,
        status_interval,
        cache_file,
    };
    edge_agent::pipeline::run(options, shutdown)
        .await
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "kubernetes"))]
async fn run_pipeline(_feed: Feed, _shutdown: CancellationToken) -> Result<(), String> {
    Err("this edge-agent was built without Kubernetes support (cargo feature `kubernetes`): use --config".into())
}

fn decode(dbc: &[PathBuf], log: &std::path::Path) -> ExitCode {
    use edgefleet_can::DecodeLogError;
    let input: Box<dyn std::io::BufRead> = if log.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        match std::fs::File::open(log) {
            Ok(f) => Box::new(std::io::BufReader::new(f)),
            Err(e) => {
                eprintln!("{}: cannot open the log: {e}", log.display());
                return ExitCode::FAILURE;
            }
        }
    };
    match edgefleet_can::decode_log(
        dbc,
        input,
        std::io::stdout().lock(),
        std::io::stderr().lock(),
    ) {
        Ok(stats) => {
            eprintln!(
                "{} lines: {} decoded, {} without a DBC entry, {} too short, {} remote/error frames, {} malformed",
                stats.lines, stats.decoded, stats.no_dbc_entry, stats.short, stats.skipped, stats.malformed
            );
            ExitCode::SUCCESS
        }
        Err(DecodeLogError::Dbc(e)) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("{}: {e}", log.display());
            ExitCode::FAILURE
        }
    }
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down: stopping sources, flushing the buffer, closing the stream");
    shutdown.cancel();
}
