//! Harness for edgefleet's cross-process tests: real Mosquitto, real
//! `cloud-ingest` and `edge-agent` processes, real mutual TLS, SIGKILL.
//!
//! The binaries are taken from the cargo target directory this test was
//! built into; build them first (`cargo build --workspace --bins`, which the
//! README's test command does).
//!
//! `EDGEFLEET_AGENT_CMD` replaces the `edge-agent` binary with another command
//! (see [`agent_command`]), e.g. the static aarch64 agent under qemu-user:
//! `EDGEFLEET_AGENT_CMD="qemu-aarch64-static target/dist/aarch64-unknown-linux-musl/edge-agent"`
//! (`cross/test-aarch64.sh`). Everything else stays the host's.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

mod small_disk;
pub use small_disk::SmallDisk;

/// The directory holding the workspace's binaries (target/debug or target/release).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let mut dir = exe.parent().expect("deps dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` (same profile) before the tests",
        path.display()
    );
    path
}

/// The environment variable that overrides how the edge agent is started.
pub const AGENT_CMD_ENV: &str = "EDGEFLEET_AGENT_CMD";

/// A command that runs `edge-agent`: the workspace binary, or the command in
/// `EDGEFLEET_AGENT_CMD` when set (words split at whitespace: the program,
/// then arguments that go before the agent's own; no quoting).
pub fn agent_command() -> Command {
    match std::env::var(AGENT_CMD_ENV) {
        Ok(line) if !line.trim().is_empty() => {
            let mut words = line.split_whitespace();
            let mut command = Command::new(words.next().expect("non-empty"));
            command.args(words);
            command
        }
        Ok(_) => {
            panic!("{AGENT_CMD_ENV} is set but empty; unset it to use the workspace's edge-agent")
        }
        Err(std::env::VarError::NotPresent) => Command::new(bin("edge-agent")),
        Err(e) => panic!("{AGENT_CMD_ENV}: {e}"),
    }
}

/// A loopback TCP port, free now, for a server that a test starts later.
///
/// Taken from below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`). A port from inside it, which is what
/// binding port 0 hands out, can be taken before the server starts as the
/// source port of any outgoing connection (an agent retrying its uplink,
/// a device simulator), and the server then fails with "address in use".
/// Ports below the range are never handed out implicitly. Each port is
/// returned once per process; the start is spread by process id so
/// concurrent test processes rarely probe the same ports.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let ephemeral_low = u32::from(ephemeral_ports_start());
    let low = 10_000u32;
    if ephemeral_low <= low + 1000 {
        // Too few ports below the range; fall back to what the kernel picks.
        return TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
    }
    let span = ephemeral_low - low;
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let port = (low + NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {low}..{ephemeral_low}");
}

/// The first port of the kernel's ephemeral range (Linux's default when
/// it cannot be read).
pub fn ephemeral_ports_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// Polls `check` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    check()
}

/// A child process whose stderr goes to a log file; killed when dropped.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, command: &mut Command, log: PathBuf) -> anyhow::Result<Proc> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("log file {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            name: name.into(),
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a graceful exit; returns the exit status code.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not exit within {timeout:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the process listens on `port`; fails at once, with the
    /// end of its log, if it exits first (a bad flag, a port in use).
    pub fn wait_for_port(&mut self, port: u16, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(());
            }
            if !self.is_running() {
                bail!(
                    "{} exited before listening on port {port}; its log ends:\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "{} does not listen on port {port} after {timeout:?}; its log ends:\n{}",
            self.name,
            self.log_tail(40)
        )
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A real Mosquitto broker on a loopback port.
pub struct Mosquitto {
    pub port: u16,
    /// The TLS listener's port, when it has one.
    pub tls_port: Option<u16>,
    pub proc: Proc,
    binary: PathBuf,
    conf: PathBuf,
    log: PathBuf,
}

/// Certificate, key and client CA of a broker's TLS listener; it requires
/// a client certificate issued by that CA.
pub struct BrokerTls<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub client_ca: &'a Path,
}

impl Mosquitto {
    /// Started with `max_inflight_messages` set to `window` (0: no limit).
    pub fn with_window(dir: &Path, window: u32) -> anyhow::Result<Mosquitto> {
        Self::start(dir, window, None)
    }

    /// A plain listener and, when `tls` is given, a TLS one beside it.
    pub fn start(dir: &Path, window: u32, tls: Option<BrokerTls>) -> anyhow::Result<Mosquitto> {
        let binary = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .context("mosquitto is not installed (apt-get install mosquitto)")?;
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        // Deep queues so an agent that is down (killed) finds everything
        // waiting in its persistent session; a wide in-flight window so the
        // agent's group commit has company. `user root`: the broker reads
        // the test's key files, which only their owner may.
        let mut text = format!(
            "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 10000000\nmax_inflight_messages {window}\nlog_dest stderr\nlog_type error\nlog_type warning\n"
        );
        let tls_port = tls.map(|tls| {
            let tls_port = free_port();
            text.push_str(&format!(
                "listener {tls_port} 127.0.0.1\ncertfile {}\nkeyfile {}\ncafile {}\nrequire_certificate true\n",
                tls.cert.display(),
                tls.key.display(),
                tls.client_ca.display()
            ));
            tls_port
        });
        std::fs::write(&conf, text)?;
        let log = dir.join("mosquitto.log");
        let proc = Self::spawn(&binary, &conf, &log, port, tls_port)?;
        Ok(Mosquitto {
            port,
            tls_port,
            proc,
            binary,
            conf,
            log,
        })
    }

    fn spawn(
        binary: &Path,
        conf: &Path,
        log: &Path,
        port: u16,
        tls_port: Option<u16>,
    ) -> anyhow::Result<Proc> {
        let mut proc = Proc::spawn(
            "mosquitto",
            Command::new(binary).arg("-c").arg(conf),
            log.to_path_buf(),
        )?;
        for port in std::iter::once(port).chain(tls_port) {
            proc.wait_for_port(port, Duration::from_secs(10))?;
        }
        Ok(proc)
    }

    /// SIGKILLs the broker and starts it again on the same ports. It keeps
    /// no sessions (no persistence): what it held is gone.
    pub fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        self.proc.kill9();
        self.proc = Self::spawn(
            &self.binary,
            &self.conf,
            &self.log,
            self.port,
            self.tls_port,
        )?;
        Ok(())
    }
}

/// One `GET` over plain HTTP/1.0 (metrics and status endpoints on loopback).
pub fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok(body)
}

/// The value of a Prometheus sample, e.g. `metric(&text, "edge_records_out_total", "")`
/// or with labels `metric(&text, "edge_dropped_records_total", "reason=\"buffer_full\"")`.
pub fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    let want = if labels.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{labels}}}")
    };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == want).then(|| value.parse().ok()).flatten()
        })
}

/// What the store holds, checked against what the simulator published.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delivery {
    pub stored: u64,
    pub duplicates: u64,
    pub lost: u64,
    pub out_of_order: u64,
    pub per_device: BTreeMap<String, u64>,
}

/// Compares stored records (JSON lines from `cloud-ingest query`, ordered by
/// sequence number) with `devices` × `messages` published counters.
/// `skip` says which counters were deliberately not valid records
/// (malformed payloads).
pub fn check_delivery(
    query_output: &str,
    devices: u32,
    messages: u64,
    skip: impl Fn(u64) -> bool,
) -> anyhow::Result<Delivery> {
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for line in query_output.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("query line: {line}"))?;
        let device = v["device"].as_str().context("device field")?.to_string();
        let n = v["signals"]["n"]
            .as_u64()
            .with_context(|| format!("signals.n in {line}"))?;
        seen.entry(device).or_default().push(n);
    }
    let mut d = Delivery::default();
    for k in 0..devices {
        let device = format!("dev-{k:03}");
        let ns = seen.remove(&device).unwrap_or_default();
        d.stored += ns.len() as u64;
        d.per_device.insert(device, ns.len() as u64);
        d.out_of_order += ns.windows(2).filter(|w| w[1] < w[0]).count() as u64;
        let mut sorted = ns.clone();
        sorted.sort_unstable();
        let before = sorted.len();
        sorted.dedup();
        d.duplicates += (before - sorted.len()) as u64;
        let expected = (0..messages).filter(|n| !skip(*n)).count() as u64;
        d.lost += expected.saturating_sub(sorted.len() as u64);
    }
    if let Some((device, ns)) = seen.into_iter().next() {
        bail!("records from unexpected device {device}: {}", ns.len());
    }
    Ok(d)
}

/// Options of one agent's configuration file.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub id: String,
    pub max_bytes: String,
    pub when_full: &'static str,
    /// Certificate and key to present (default: the agent's own from the dev PKI).
    pub cert: Option<(PathBuf, PathBuf)>,
    pub client_id: String,
    pub metrics_port: u16,
    /// `--node-name` (with a site certificate, the stream is `<node>@<site>`).
    pub node: Option<String>,
    /// The MQTT source's `sharedGroup`.
    pub shared_group: Option<String>,
    /// The MQTT source's `keepAliveSecs`.
    pub keep_alive_secs: u16,
    /// Connect to the broker's TLS listener, at `localhost`, with this CA
    /// file, client certificate and key.
    pub mqtt_tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// `--worker-threads` (default: the agent's own, one).
    pub worker_threads: Option<u16>,
}

impl AgentOptions {
    pub fn new(id: &str) -> Self {
        Self {
            id: id.into(),
            max_bytes: "256MiB".into(),
            when_full: "block",
            cert: None,
            client_id: format!("edgefleet-{id}"),
            metrics_port: free_port(),
            node: None,
            shared_group: None,
            keep_alive_secs: 30,
            mqtt_tls: None,
            worker_threads: None,
        }
    }
}

/// A whole test fleet: dev PKI, Mosquitto, one ingest, agents.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub pki: edgefleet_pki::dev::DevPki,
    pub mqtt: Mosquitto,
    pub ingest_port: u16,
    pub ingest_metrics_port: u16,
    pub store: PathBuf,
    pub ingest: Option<Proc>,
}

impl Fleet {
    pub fn new(agent_ids: &[&str]) -> anyhow::Result<Fleet> {
        Self::with_broker_window(agent_ids, 1000)
    }

    /// A fleet whose broker has this in-flight window (0: no limit).
    pub fn with_broker_window(agent_ids: &[&str], window: u32) -> anyhow::Result<Fleet> {
        let dir = tempfile::tempdir()?;
        let ids: Vec<String> = agent_ids.iter().map(|s| s.to_string()).collect();
        let pki = edgefleet_pki::dev::init(
            &dir.path().join("pki"),
            &ids,
            &["localhost".into(), "127.0.0.1".into()],
        )?;
        let mqtt = Mosquitto::with_window(dir.path(), window)?;
        Ok(Fleet {
            store: dir.path().join("store"),
            pki,
            mqtt,
            ingest_port: free_port(),
            ingest_metrics_port: free_port(),
            ingest: None,
            dir,
        })
    }

    pub fn start_ingest(&mut self) -> anyhow::Result<()> {
        let proc = Proc::spawn(
            "cloud-ingest",
            Command::new(bin("cloud-ingest"))
                .arg("serve")
                .arg("--listen")
                .arg(format!("127.0.0.1:{}", self.ingest_port))
                .arg("--cert")
                .arg(self.pki.server_cert())
                .arg("--key")
                .arg(self.pki.server_key())
                .arg("--client-ca")
                .arg(self.pki.ca_cert())
                .arg("--store")
                .arg(&self.store)
                .arg("--metrics-listen")
                .arg(format!("127.0.0.1:{}", self.ingest_metrics_port)),
            self.dir.path().join("ingest.log"),
        )?;
        let proc = self.ingest.insert(proc);
        proc.wait_for_port(self.ingest_port, Duration::from_secs(20))?;
        proc.wait_for_port(self.ingest_metrics_port, Duration::from_secs(20))?;
        Ok(())
    }

    pub fn ingest_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ingest.log")).unwrap_or_default()
    }

    /// Writes the agent's configuration file and returns its path.
    pub fn agent_config(&self, o: &AgentOptions) -> anyhow::Result<PathBuf> {
        let (cert, key) = o
            .cert
            .clone()
            .unwrap_or_else(|| (self.pki.agent_cert(&o.id), self.pki.agent_key(&o.id)));
        let data_dir = self.dir.path().join(format!("agent-{}", o.id));
        let text = format!(
            r#"agent:
  dataDir: {data}
sources:
  mqtt:
    - name: mqtt
      host: {mqtt_host}
      port: {mqtt}
      clientId: {client_id}
      cleanSession: false
      keepAliveSecs: {keep_alive}{shared}{tls}
      subscriptions:
        - topic: devices/+/telemetry
          qos: 1
          deviceFromTopic: devices/{{device}}/telemetry
buffer:
  maxBytes: {max_bytes}
  whenFull: {when_full}
uplink:
  endpoint: https://127.0.0.1:{ingest}
  serverName: localhost
  caFile: {ca}
  certFile: {cert}
  keyFile: {key}
  backoff:
    initialMs: 100
    maxMs: 1000
  ackTimeoutMs: 10000
metrics:
  listen: 127.0.0.1:{metrics}
"#,
            data = data_dir.display(),
            mqtt_host = if o.mqtt_tls.is_some() {
                "localhost"
            } else {
                "127.0.0.1"
            },
            mqtt = match o.mqtt_tls {
                Some(_) => self
                    .mqtt
                    .tls_port
                    .context("the broker has no TLS listener")?,
                None => self.mqtt.port,
            },
            client_id = o.client_id,
            keep_alive = o.keep_alive_secs,
            tls = o
                .mqtt_tls
                .as_ref()
                .map(|(ca, cert, key)| format!(
                    "\n      tls:\n        caFile: {}\n        certFile: {}\n        keyFile: {}",
                    ca.display(),
                    cert.display(),
                    key.display()
                ))
                .unwrap_or_default(),
            shared = o
                .shared_group
                .as_ref()
                .map(|group| format!("\n      sharedGroup: {group}"))
                .unwrap_or_default(),
            max_bytes = o.max_bytes,
            when_full = o.when_full,
            ingest = self.ingest_port,
            ca = self.pki.ca_cert().display(),
            cert = cert.display(),
            key = key.display(),
            metrics = o.metrics_port,
        );
        let path = self.dir.path().join(format!("agent-{}.yaml", o.id));
        std::fs::write(&path, text)?;
        Ok(path)
    }

    pub fn agent_data_dir(&self, id: &str) -> PathBuf {
        self.dir.path().join(format!("agent-{id}"))
    }

    /// Starts an agent and waits until its MQTT source has subscribed.
    pub fn start_agent(&self, o: &AgentOptions) -> anyhow::Result<Proc> {
        let proc = self.spawn_agent(o)?;
        // Up means subscribed (SUBACK): a message published before that
        // would be dropped by the broker, and the test would count it lost.
        let subscribed = wait_until(Duration::from_secs(30), || {
            http_get(o.metrics_port, "/metrics")
                .ok()
                .and_then(|text| metric(&text, "edge_source_up", "source=\"mqtt\""))
                == Some(1.0)
        });
        if !subscribed {
            bail!(
                "edge-agent {} did not subscribe within 30 s; its log:\n{}",
                o.id,
                proc.log_text()
            );
        }
        Ok(proc)
    }

    /// Starts an agent and waits only for its metrics endpoint.
    pub fn spawn_agent(&self, o: &AgentOptions) -> anyhow::Result<Proc> {
        let config = self.agent_config(o)?;
        let mut command = agent_command();
        command
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info");
        if let Some(node) = &o.node {
            command.arg("--node-name").arg(node);
        }
        if let Some(threads) = o.worker_threads {
            command.arg("--worker-threads").arg(threads.to_string());
        }
        let mut proc = Proc::spawn(
            &format!("edge-agent {}", o.id),
            &mut command,
            self.dir.path().join(format!("agent-{}.log", o.id)),
        )?;
        proc.wait_for_port(o.metrics_port, Duration::from_secs(20))?;
        Ok(proc)
    }

    /// Starts the device simulator; wait for it with [`Publisher::wait`].
    pub fn publish(
        &self,
        devices: u32,
        messages: u64,
        rate: u64,
        bad_every: u64,
    ) -> anyhow::Result<Publisher> {
        self.publish_with_noise(devices, messages, rate, bad_every, 0)
    }

    /// [`Fleet::publish`] with `noise_bytes` random characters in every
    /// message, which compression cannot take away: for tests that must
    /// fill a byte cap (the agent's buffer stores telemetry compressed).
    pub fn publish_with_noise(
        &self,
        devices: u32,
        messages: u64,
        rate: u64,
        bad_every: u64,
        noise_bytes: usize,
    ) -> anyhow::Result<Publisher> {
        let out = self.dir.path().join(format!("devsim-{}.out", free_port()));
        let proc = Proc::spawn(
            "devsim",
            Command::new(bin("devsim"))
                .arg("--port")
                .arg(self.mqtt.port.to_string())
                .arg("--devices")
                .arg(devices.to_string())
                .arg("--messages")
                .arg(messages.to_string())
                .arg("--rate")
                .arg(rate.to_string())
                .arg("--bad-every")
                .arg(bad_every.to_string())
                .arg("--noise-bytes")
                .arg(noise_bytes.to_string())
                .arg("--client-id")
                .arg(format!("devsim-{}", free_port())),
            out.clone(),
        )?;
        Ok(Publisher { proc, out })
    }

    /// Records in the store now, from the running ingest's `/stats` (the
    /// store's own count, so it survives ingest restarts, unlike a counter).
    pub fn stored(&self) -> u64 {
        http_get(self.ingest_metrics_port, "/stats")
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|v| v["total_records"].as_u64())
            .unwrap_or(0)
    }

    /// Everything in the store, as JSON lines. The ingest must be stopped
    /// (the embedded store admits one process).
    pub fn query_store(&self) -> anyhow::Result<String> {
        let output = Command::new(bin("cloud-ingest"))
            .arg("query")
            .arg("--store")
            .arg(&self.store)
            .arg("--limit")
            .arg("100000000")
            .output()?;
        if !output.status.success() {
            bail!("query failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8(output.stdout)?)
    }
}

pub struct Publisher {
    pub proc: Proc,
    out: PathBuf,
}

impl Publisher {
    /// Waits for the simulator to finish; returns how many messages the broker acknowledged.
    pub fn wait(mut self, timeout: Duration) -> anyhow::Result<u64> {
        if !wait_until(timeout, || !self.proc.is_running()) {
            bail!("devsim still running after {timeout:?}");
        }
        let text = std::fs::read_to_string(&self.out)?;
        let line = text
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .with_context(|| format!("devsim printed no summary: {text}"))?;
        let v: serde_json::Value = serde_json::from_str(line)?;
        v["acknowledged"].as_u64().context("acknowledged")
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }
}

#[cfg(test)]
mod harness_tests {
    use super::*;

    #[test]
    fn free_ports_are_below_the_ephemeral_range_and_not_repeated() {
        let low = ephemeral_ports_start();
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        assert!(ports.iter().all(|&p| p < low), "{ports:?} vs {low}");
        let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len());
    }

    #[test]
    fn a_process_that_exits_before_listening_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut proc = Proc::spawn(
            "failing server",
            Command::new("sh").args(["-c", "echo 'address already in use' >&2; exit 3"]),
            dir.path().join("failing.log"),
        )
        .unwrap();
        let started = Instant::now();
        let error = proc
            .wait_for_port(free_port(), Duration::from_secs(20))
            .unwrap_err()
            .to_string();
        assert!(started.elapsed() < Duration::from_secs(10), "not at once");
        assert!(error.contains("failing server exited"), "{error}");
        assert!(error.contains("address already in use"), "{error}");
    }
}
