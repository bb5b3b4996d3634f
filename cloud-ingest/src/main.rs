//! `cloud-ingest`: the server (`serve`) and its store tools (`query`, `stats`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use cloud_ingest::query::{http_get, record_json, QueryParams, RecordSource};
use cloud_ingest::sink::EmbeddedStore;
use cloud_ingest::{
    CancellationToken, EmbeddedConfig, IngestConfig, Retention, SinkConfig, TlsMode,
};

/// edgefleet cloud ingest: receives device telemetry from edge agents over
/// mutually authenticated gRPC and stores every record exactly once.
#[derive(Parser, Debug)]
#[command(name = "cloud-ingest", version, propagate_version = true)]
struct Cli {
    /// Log format (logs go to stderr; the level follows RUST_LOG, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CLOUD_INGEST_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the ingest server.
    ///
    /// Agents connect with mutual TLS: the server requires a client
    /// certificate issued by --client-ca and takes the agent's identity from
    /// it. Stops gracefully on SIGTERM or SIGINT: every batch already received
    /// is committed and acknowledged, agents get GoAway, then it exits 0.
    #[command(
        after_help = "Example:\n  cloud-ingest serve --cert ingest.pem --key ingest.key --client-ca ca.pem \\\n      --store /var/lib/edgefleet/ingest --retention-age 7d --retention-bytes 10GiB"
    )]
    Serve(Box<ServeArgs>),
    /// Print stored records as JSON lines, ordered by agent then seq.
    ///
    /// Each line: {"agent","seq","source","device","timestamp_ns","signals":{name:value}}
    /// or "raw_base64" and "content_type" for raw payloads. While a server
    /// holds the store, use --url with its --metrics-listen address instead.
    #[command(
        after_help = "Examples:\n  cloud-ingest query --store /var/lib/edgefleet/ingest --agent gw-1 --since 10m\n  cloud-ingest query --url http://127.0.0.1:9465 --device truck-7 --limit 20"
    )]
    Query(QueryArgs),
    /// Print per-agent record counts and stored_through as JSON.
    ///
    /// Output: {"agents":{"<id>":{"records":N,"stored_through":S}},"total_records":N,"stored_bytes":B}
    Stats(SourceArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address for agents (gRPC over mutual TLS).
    #[arg(long, default_value = "0.0.0.0:7443", env = "CLOUD_INGEST_LISTEN")]
    listen: SocketAddr,
    /// The server's certificate chain (PEM).
    #[arg(
        long,
        env = "CLOUD_INGEST_CERT",
        required_unless_present = "insecure_plaintext_dev_only"
    )]
    cert: Option<PathBuf>,
    /// The server's private key (PEM).
    #[arg(
        long,
        env = "CLOUD_INGEST_KEY",
        required_unless_present = "insecure_plaintext_dev_only"
    )]
    key: Option<PathBuf>,
    /// CA certificate(s) (PEM) that agent certificates must be issued by.
    #[arg(
        long,
        env = "CLOUD_INGEST_CLIENT_CA",
        required_unless_present = "insecure_plaintext_dev_only"
    )]
    client_ca: Option<PathBuf>,
    /// Serve plaintext gRPC without any authentication; the agent id is taken
    /// from Hello. Only for a developer's own machine.
    #[arg(long, conflicts_with_all = ["cert", "key", "client_ca"])]
    insecure_plaintext_dev_only: bool,
    /// Directory of the embedded store (created if missing).
    #[arg(long, env = "CLOUD_INGEST_STORE", required_unless_present = "discard")]
    store: Option<PathBuf>,
    /// Store nothing and acknowledge every batch at once: measures the
    /// transport (TLS, gRPC, sessions) alone. Benchmarks only; data is lost.
    #[arg(long, conflicts_with = "store")]
    discard: bool,
    /// Delete records ingested longer ago than this (e.g. 7d, 12h).
    #[arg(long, value_parser = parse_duration, env = "CLOUD_INGEST_RETENTION_AGE")]
    retention_age: Option<Duration>,
    /// Delete the oldest records while the store holds more than this (e.g. 10GiB).
    #[arg(long, value_parser = cloud_ingest::config::parse_bytes, env = "CLOUD_INGEST_RETENTION_BYTES")]
    retention_bytes: Option<u64>,
    /// How often retention runs.
    #[arg(long, value_parser = parse_duration, default_value = "1m")]
    retention_interval: Duration,
    /// HTTP admin address: /metrics, /healthz, /readyz, /query, /stats.
    /// Unauthenticated (it serves stored data): keep it on loopback or a
    /// cluster-internal network. "off" disables it.
    #[arg(long, default_value = "127.0.0.1:9465", value_parser = parse_optional_addr, env = "CLOUD_INGEST_METRICS_LISTEN")]
    metrics_listen: OptionalAddr,
    /// Plaintext address serving only grpc.health.v1, for probes that cannot
    /// present a client certificate (e.g. the kubelet's gRPC probe).
    #[arg(long, env = "CLOUD_INGEST_HEALTH_LISTEN")]
    health_listen: Option<SocketAddr>,
    /// Largest message accepted, after decompression (e.g. 4MiB); larger ones
    /// fail their stream with RESOURCE_EXHAUSTED.
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    max_message_bytes: usize,
    /// Unacknowledged batches an agent may have in flight.
    #[arg(long, default_value_t = cloud_ingest::config::DEFAULT_CREDIT)]
    credit: u32,
    /// Received-but-uncommitted bytes across all agents; when used up, the
    /// server stops reading until commits catch up.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    byte_budget: usize,
    /// Heartbeat interval announced to agents; a stream silent for three of
    /// these is closed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// Time an agent has to send Hello on a new stream.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    hello_timeout: Duration,
    /// Time a TLS handshake may take.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    handshake_timeout: Duration,
    /// HTTP/2 keepalive ping interval.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    http2_keepalive_interval: Duration,
    /// Time to wait for a keepalive ping's answer before closing the connection.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    http2_keepalive_timeout: Duration,
    /// Reconnect delay suggested to agents in GoAway.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    goaway_retry_after: Duration,
    /// On shutdown, how long to wait for streams to finish.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct Source {
    /// Store directory (only while no server has it open).
    #[arg(long)]
    store: Option<PathBuf>,
    /// A running server's admin URL (its --metrics-listen), e.g. http://127.0.0.1:9465.
    #[arg(long)]
    url: Option<String>,
}

#[derive(Args, Debug)]
struct SourceArgs {
    #[command(flatten)]
    source: Source,
}

#[derive(Args, Debug)]
struct QueryArgs {
    #[command(flatten)]
    source: Source,
    /// Only this agent's records.
    #[arg(long)]
    agent: Option<String>,
    /// Only this device's records.
    #[arg(long)]
    device: Option<String>,
    /// Only records measured at or after this: RFC 3339 (2025-01-31T12:00:00Z)
    /// or a duration ago (10m, 2h, 7d).
    #[arg(long)]
    since: Option<String>,
    /// At most this many records.
    #[arg(long)]
    limit: Option<usize>,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("`{text}`: {e} (e.g. 500ms, 10s, 5m, 7d)"))
}

fn parse_size(text: &str) -> Result<usize, String> {
    let bytes = cloud_ingest::config::parse_bytes(text)?;
    usize::try_from(bytes).map_err(|_| format!("`{text}` is too large"))
}

/// An address or `off` (a newtype: clap reads a bare `Option` as "flag may be absent").
#[derive(Clone, Copy, Debug)]
struct OptionalAddr(Option<SocketAddr>);

fn parse_optional_addr(text: &str) -> Result<OptionalAddr, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(OptionalAddr(None));
    }
    text.parse()
        .map(|a| OptionalAddr(Some(a)))
        .map_err(|e| format!("`{text}`: {e} (an address like 0.0.0.0:9465, or off)"))
}

fn main() -> std::process::ExitCode {
    let thresholds = cloud_ingest::malloc::pin_thresholds();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    tracing::debug!(?thresholds, "the allocator's mmap and trim thresholds");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping a cause whose text the
/// message already includes (many of our errors embed their source).
fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve(args) => serve(*args).await,
        Command::Query(args) => query(args).await,
        Command::Stats(args) => stats(args.source).await,
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    // One descriptor per connected agent: a soft limit of 1024 would refuse
    // agents long before memory or CPU run out.
    match cloud_ingest::limits::raise_nofile_limit() {
        Ok(l) => tracing::info!(
            soft = l.soft,
            hard = l.hard,
            soft_before = l.soft_before,
            "open-file limit (RLIMIT_NOFILE)"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let tls = if args.insecure_plaintext_dev_only {
        TlsMode::InsecurePlaintextDevOnly
    } else {
        // clap enforces presence unless --insecure-plaintext-dev-only.
        let (Some(cert), Some(key), Some(client_ca)) = (args.cert, args.key, args.client_ca) else {
            bail!("--cert, --key and --client-ca are required (or --insecure-plaintext-dev-only)");
        };
        TlsMode::Mtls {
            cert,
            key,
            client_ca,
        }
    };
    let sink = match args.store {
        Some(dir) if !args.discard => SinkConfig::Embedded(EmbeddedConfig {
            dir,
            retention: Retention {
                max_age: args.retention_age,
                max_bytes: args.retention_bytes,
                interval: args.retention_interval,
            },
        }),
        _ => SinkConfig::Discard,
    };
    let mut config = IngestConfig::new(args.listen, tls, sink);
    config.metrics_listen = args.metrics_listen.0;
    config.health_listen = args.health_listen;
    config.max_message_bytes = args.max_message_bytes;
    config.credit = args.credit;
    config.byte_budget = args.byte_budget;
    config.heartbeat_interval = args.heartbeat_interval;
    config.hello_timeout = args.hello_timeout;
    config.handshake_timeout = args.handshake_timeout;
    config.http2_keepalive_interval = args.http2_keepalive_interval;
    config.http2_keepalive_timeout = args.http2_keepalive_timeout;
    config.goaway_retry_after = args.goaway_retry_after;
    config.drain_timeout = args.drain_timeout;

    let shutdown = CancellationToken::new();
    let ingest = cloud_ingest::Ingest::bind(config).await?;
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    ingest.run(shutdown).await?;
    Ok(())
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot install signal handlers; stop with SIGKILL only");
            return;
        }
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutting down gracefully");
    shutdown.cancel();
}

async fn query(args: QueryArgs) -> Result<()> {
    let params = QueryParams {
        agent: args.agent,
        device: args.device,
        since: args.since,
        limit: args.limit,
    };
    if let Some(url) = &args.source.url {
        let path = format!("/query?{}", params.to_query_string());
        let body = http_get(url, &path).await?;
        return print(&body);
    }
    let dir = args.source.store.context("--store or --url is required")?;
    let query = params
        .to_query(SystemTime::now())
        .map_err(anyhow::Error::msg)?;
    tokio::task::spawn_blocking(move || -> Result<()> {
        let store = EmbeddedStore::open_existing(&dir)?;
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        let mut write_error = None;
        store.query(&query, &mut |agent, record| match writeln!(
            out,
            "{}",
            record_json(agent, &record)
        ) {
            Ok(()) => true,
            Err(e) => {
                write_error = Some(e);
                false
            }
        })?;
        match write_error {
            // `| head` closing the pipe is a normal way to stop reading.
            Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            Some(e) => Err(e).context("writing to stdout"),
            None => match out.flush() {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    Err(e).context("writing to stdout")
                }
                _ => Ok(()),
            },
        }
    })
    .await?
}

async fn stats(source: Source) -> Result<()> {
    if let Some(url) = &source.url {
        let body = http_get(url, "/stats").await?;
        return print(&format!("{}\n", body.trim_end()));
    }
    let dir = source.store.context("--store or --url is required")?;
    let stats =
        tokio::task::spawn_blocking(move || EmbeddedStore::open_existing(&dir)?.stats()).await??;
    print(&format!("{}\n", serde_json::to_string(&stats)?))
}

fn print(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}
