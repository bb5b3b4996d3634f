//! What the ingest is told to do: listeners, TLS material, the sink, and the
//! protocol knobs it announces to agents. The CLI in `main.rs` builds this;
//! tests and the demo build it directly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Unacknowledged batches per agent by default. A batch waits in the
/// ingest for its group commit (one fsync, ~10 ms on the benchmark
/// machine's disk), so the window has to cover several commits: with 8
/// the `spine` drain stopped at ~340k rec/s with most of a core idle; 16
/// and 32 both reached the source's own bound of ~520k rec/s
/// (BENCHMARKS.md, "spine"). 32 also covers the bandwidth-delay product
/// of a backlog drained over a slow link (32 × 2,000 records per 100 ms
/// round trip). Memory stays bounded by `byte_budget`, across agents.
pub const DEFAULT_CREDIT: u32 = 32;

/// Everything [`crate::serve`] needs. Start from [`IngestConfig::new`] and
/// change what differs from the defaults.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// gRPC listener (mTLS unless [`TlsMode::InsecurePlaintextDevOnly`]). Port 0 picks a free port.
    pub listen: SocketAddr,
    pub tls: TlsMode,
    pub sink: SinkConfig,
    /// HTTP admin listener: `/metrics`, `/healthz`, `/readyz`, `/query`, `/stats`.
    pub metrics_listen: Option<SocketAddr>,
    /// Plaintext listener serving only `grpc.health.v1`, for probes that
    /// cannot present a client certificate (the kubelet's gRPC probe).
    pub health_listen: Option<SocketAddr>,
    /// Largest accepted message after decompression; larger ones fail their
    /// stream with RESOURCE_EXHAUSTED. Announced in `HelloAck.max_message_bytes`.
    pub max_message_bytes: usize,
    /// Batches an agent may have unacknowledged (`HelloAck.credit`). Also the
    /// per-stream window: a stream with this many batches pending is not read.
    pub credit: u32,
    /// Bytes of received-but-uncommitted batches across all streams. When it
    /// is used up, streams stop reading until commits free some.
    pub byte_budget: usize,
    /// Announced heartbeat interval; a stream silent for three of these is closed.
    pub heartbeat_interval: Duration,
    /// A stream must send `Hello` within this.
    pub hello_timeout: Duration,
    /// A TLS handshake must finish within this.
    pub handshake_timeout: Duration,
    /// HTTP/2 keepalive ping interval and the time to wait for its answer.
    pub http2_keepalive_interval: Duration,
    pub http2_keepalive_timeout: Duration,
    /// Told to agents in `GoAway` when draining.
    pub goaway_retry_after: Duration,
    /// How long a graceful shutdown waits for streams to finish before giving up on them.
    pub drain_timeout: Duration,
}

impl IngestConfig {
    /// Defaults for everything but the listener, TLS material and sink.
    pub fn new(listen: SocketAddr, tls: TlsMode, sink: SinkConfig) -> Self {
        Self {
            listen,
            tls,
            sink,
            metrics_listen: None,
            health_listen: None,
            max_message_bytes: 4 * 1024 * 1024,
            credit: DEFAULT_CREDIT,
            byte_budget: 256 * 1024 * 1024,
            heartbeat_interval: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(20),
            goaway_retry_after: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(30),
        }
    }

    /// The idle deadline: no batch or heartbeat for this long ends a stream.
    pub fn idle_timeout(&self) -> Duration {
        self.heartbeat_interval * 3
    }
}

/// How agents connect.
#[derive(Debug, Clone)]
pub enum TlsMode {
    /// Mutual TLS: the server presents `cert`/`key` and requires a client
    /// certificate issued by a CA in `client_ca`. All PEM files.
    Mtls {
        cert: PathBuf,
        key: PathBuf,
        client_ca: PathBuf,
    },
    /// No TLS at all; the agent id is taken from `Hello`. For a developer's
    /// laptop only: anyone can claim to be any agent.
    InsecurePlaintextDevOnly,
}

/// Where committed records go. Each sink is one module under `sink/`.
#[derive(Debug, Clone)]
pub enum SinkConfig {
    Embedded(EmbeddedConfig),
    /// Store nothing, acknowledge at once (transport benchmarks only).
    Discard,
}

/// The embedded sled store.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    pub dir: PathBuf,
    pub retention: Retention,
}

impl EmbeddedConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            retention: Retention::default(),
        }
    }
}

/// Which records the embedded store deletes, oldest (by ingest time) first.
#[derive(Debug, Clone)]
pub struct Retention {
    /// Delete records ingested longer ago than this.
    pub max_age: Option<Duration>,
    /// Delete the oldest records while the stored bytes (keys and values,
    /// not the file size, which sled shrinks lazily) exceed this.
    pub max_bytes: Option<u64>,
    /// How often the retention pass runs.
    pub interval: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_age: None,
            max_bytes: None,
            interval: Duration::from_secs(60),
        }
    }
}

/// Parses a byte size such as `4194304`, `4MiB`, `10GiB`, `500MB` or `64k`.
/// Binary (KiB, MiB, ...) and decimal (kB, MB, ...) units; a bare `k`/`M`/`G`/`T` is binary.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().map_err(|_| {
        format!("`{text}` is not a size: expected a number with an optional unit such as MiB or GB")
    })?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
            "`{text}`: unknown size unit `{other}` (use B, KiB, MiB, GiB, TiB, kB, MB, GB or TB)"
        ))
        }
    };
    let bytes = number * multiplier as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{text}` is out of range"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_bytes("4194304").unwrap(), 4 << 20);
        assert_eq!(parse_bytes("4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_bytes("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_bytes("10 GiB").unwrap(), 10 << 30);
        assert_eq!(parse_bytes("1.5k").unwrap(), 1536);
        assert_eq!(parse_bytes("500MB").unwrap(), 500_000_000);
        let err = parse_bytes("10 parsecs").unwrap_err();
        assert!(err.contains("parsecs"), "{err}");
        assert!(parse_bytes("lots").is_err());
    }
}
