//! The scenarios and what they share: starting the ingest, sampling a
//! counter over time, latency histograms.

pub mod can_decode;
pub mod drain;
pub mod fan_in;
pub mod footprint;
pub mod mqtt_e2e;
pub mod spine;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgefleet_tests::{bin, free_port, http_get, Proc};
use hdrhistogram::Histogram;

use crate::report::{Figure, Series};

/// A cloud-ingest process (the release binary) on loopback with mTLS.
pub struct IngestProc {
    pub proc: Proc,
    pub port: u16,
    pub metrics_port: u16,
}

/// Starts `cloud-ingest serve` with the dev PKI; `store: None` = `--discard`.
pub fn start_ingest(
    dir: &Path,
    pki: &edgefleet_pki::dev::DevPki,
    store: Option<&Path>,
    name: &str,
) -> anyhow::Result<IngestProc> {
    let port = free_port();
    let metrics_port = free_port();
    let mut command = Command::new(bin("cloud-ingest"));
    command
        .arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--cert")
        .arg(pki.server_cert())
        .arg("--key")
        .arg(pki.server_key())
        .arg("--client-ca")
        .arg(pki.ca_cert())
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .env("RUST_LOG", "warn");
    // For experiments (e.g. `--credit 32`); published runs leave it unset.
    if let Ok(extra) = std::env::var("EDGEFLEET_BENCH_INGEST_ARGS") {
        command.args(extra.split_whitespace());
    }
    match store {
        Some(store) => command.arg("--store").arg(store),
        None => command.arg("--discard"),
    };
    let mut proc = Proc::spawn(name, &mut command, dir.join(format!("{name}.log")))?;
    proc.wait_for_port(port, Duration::from_secs(30))?;
    proc.wait_for_port(metrics_port, Duration::from_secs(30))?;
    Ok(IngestProc {
        proc,
        port,
        metrics_port,
    })
}

impl IngestProc {
    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }
    /// Records in the store (the ingest's `/stats`).
    pub fn stored(&self) -> u64 {
        stored(self.metrics_port)
    }
}

pub fn stored(metrics_port: u16) -> u64 {
    http_get(metrics_port, "/stats")
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|v| v["total_records"].as_u64())
        .unwrap_or(0)
}

/// Bytes the ingest has read from its TLS connections so far: what the
/// link carried, compressed and encrypted.
pub fn bytes_received(metrics_port: u16) -> f64 {
    let text = http_get(metrics_port, "/metrics").unwrap_or_default();
    edgefleet_tests::metric(&text, "ingest_bytes_received_total", "").unwrap_or(0.0)
}

/// The ingest's group commits so far: (commits, seconds in them, batches).
pub fn commit_totals(metrics_port: u16) -> (f64, f64, f64) {
    let text = http_get(metrics_port, "/metrics").unwrap_or_default();
    let m = |name| edgefleet_tests::metric(&text, name, "").unwrap_or(0.0);
    (
        m("ingest_commit_seconds_count"),
        m("ingest_commit_seconds_sum"),
        m("ingest_batches_total"),
    )
}

/// A Prometheus histogram's cumulative buckets from `/metrics`: (upper
/// bound in seconds, observations at or under it), `+Inf` last.
pub fn histogram_buckets(metrics_port: u16, name: &str) -> Vec<(f64, f64)> {
    let text = http_get(metrics_port, "/metrics").unwrap_or_default();
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (bound, count) = rest.split_once("\"} ")?;
            let bound = if bound == "+Inf" {
                f64::INFINITY
            } else {
                bound.parse().ok()?
            };
            Some((bound, count.trim().parse().ok()?))
        })
        .collect()
}

/// Group commits between two readings of a commit-duration histogram.
pub struct CommitTail {
    pub commits: f64,
    /// The bucket bound (seconds) under which 99 % of them took.
    pub p99_at_most: f64,
    /// How many took longer than `slow`.
    pub slower: f64,
    /// The bucket bound (seconds) under which the slowest took.
    pub max_at_most: f64,
}

impl CommitTail {
    pub fn between(before: &[(f64, f64)], after: &[(f64, f64)], slow: f64) -> CommitTail {
        let at = |buckets: &[(f64, f64)], bound: f64| {
            buckets
                .iter()
                .find(|(b, _)| *b == bound)
                .map_or(0.0, |(_, n)| *n)
        };
        let delta: Vec<(f64, f64)> = after
            .iter()
            .map(|&(bound, n)| (bound, n - at(before, bound)))
            .collect();
        let commits = delta.last().map_or(0.0, |&(_, n)| n);
        // The first bound with at least this share of the commits under it.
        let bound_of = |share: f64| {
            delta
                .iter()
                .find(|&&(_, n)| n >= share * commits)
                .map_or(f64::NAN, |&(bound, _)| bound)
        };
        let within_slow = delta
            .iter()
            .filter(|&&(bound, _)| bound <= slow)
            .map(|&(_, n)| n)
            .fold(0.0, f64::max);
        CommitTail {
            commits,
            p99_at_most: bound_of(0.99),
            slower: commits - within_slow,
            max_at_most: bound_of(1.0),
        }
    }
}

/// Samples `read` every `every` on a thread: (seconds since `origin`, value).
pub struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(f64, f64)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    pub fn start(
        origin: Instant,
        every: Duration,
        mut read: impl FnMut() -> f64 + Send + 'static,
    ) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, samples) = (stop.clone(), samples.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let value = read();
                    let t = origin.elapsed().as_secs_f64();
                    samples.lock().expect("samples").push((t, value));
                    std::thread::sleep(every);
                }
            })
        };
        Sampler {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    pub fn samples(&self) -> Vec<(f64, f64)> {
        self.samples.lock().expect("samples").clone()
    }

    pub fn stop(mut self) -> Vec<(f64, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.samples()
    }
}

/// A counter's samples → its rate per second between samples.
pub fn rate_series(name: &str, unit: &str, samples: &[(f64, f64)]) -> Series {
    Series {
        name: name.into(),
        unit: unit.into(),
        points: samples
            .windows(2)
            .filter(|w| w[1].0 > w[0].0)
            .map(|w| (w[1].0, (w[1].1 - w[0].1) / (w[1].0 - w[0].0)))
            .collect(),
    }
}

/// The counter's value at time `t` (linear between samples).
pub fn value_at(samples: &[(f64, f64)], t: f64) -> f64 {
    let mut before = (0.0, 0.0);
    for &(st, sv) in samples {
        if st >= t {
            if st == before.0 {
                return sv;
            }
            return before.1 + (sv - before.1) * (t - before.0) / (st - before.0);
        }
        before = (st, sv);
    }
    before.1
}

/// The longest time, between `from` and `to`, over which the counter did
/// not move (as far as its samples tell): a stall shows here even when the
/// rate over the whole phase looks fine.
pub fn longest_flat(samples: &[(f64, f64)], from: f64, to: f64) -> f64 {
    let mut longest: f64 = 0.0;
    let mut moved_at: Option<(f64, f64)> = None;
    for &(t, v) in samples.iter().filter(|(t, _)| (from..=to).contains(t)) {
        match moved_at {
            Some((since, value)) if v == value => longest = longest.max(t - since),
            _ => moved_at = Some((t, v)),
        }
    }
    longest
}

/// The first time the counter reached `value`.
pub fn time_reaching(samples: &[(f64, f64)], value: f64) -> Option<f64> {
    samples.iter().find(|(_, v)| *v >= value).map(|(t, _)| *t)
}

/// Microsecond latencies, 1 µs to 10 min, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// p50, p99, p99.9 (in milliseconds) of a histogram of microseconds, as figures.
pub fn latency_figures(prefix: &str, h: &Histogram<u64>) -> Vec<Figure> {
    [("p50", 50.0), ("p99", 99.0), ("p99.9", 99.9)]
        .into_iter()
        .map(|(name, q)| Figure {
            name: format!("{prefix} {name}"),
            value: if h.is_empty() {
                f64::NAN
            } else {
                h.value_at_quantile(q / 100.0) as f64 / 1000.0
            },
            unit: "ms".into(),
            target: None,
            met: None,
        })
        .collect()
}

/// Waits until `check` holds, polling every 20 ms; false on timeout.
pub async fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod commit_tail_tests {
    use super::CommitTail;

    #[test]
    fn the_tail_is_taken_from_the_commits_between_two_readings() {
        let inf = f64::INFINITY;
        let before = [(0.0064, 10.0), (0.0128, 10.0), (0.0256, 10.0), (inf, 10.0)];
        // 200 more commits: 190 under 6.4 ms, 5 under 12.8 ms, 5 under 25.6 ms.
        let after = [
            (0.0064, 200.0),
            (0.0128, 205.0),
            (0.0256, 210.0),
            (inf, 210.0),
        ];
        let tail = CommitTail::between(&before, &after, 0.0128);
        assert_eq!(tail.commits, 200.0);
        assert_eq!(tail.slower, 5.0);
        assert_eq!(tail.p99_at_most, 0.0256);
        assert_eq!(tail.max_at_most, 0.0256);
        let tail = CommitTail::between(&after, &after, 0.0128);
        assert_eq!((tail.commits, tail.slower), (0.0, 0.0));
    }
}

#[cfg(test)]
mod longest_flat_tests {
    use super::longest_flat;

    #[test]
    fn the_longest_stretch_without_a_change_inside_the_window() {
        let samples = [
            (0.0, 0.0),
            (1.0, 5.0),
            (2.0, 5.0),
            (3.0, 5.0),
            (4.0, 9.0),
            (5.0, 9.0),
            (6.0, 12.0),
        ];
        assert_eq!(longest_flat(&samples, 0.0, 6.0), 2.0);
        // The window cuts the long stretch to what lies inside it.
        assert_eq!(longest_flat(&samples, 2.0, 6.0), 1.0);
        assert_eq!(longest_flat(&samples, 0.0, 1.0), 0.0);
        assert_eq!(longest_flat(&[], 0.0, 6.0), 0.0);
    }
}
