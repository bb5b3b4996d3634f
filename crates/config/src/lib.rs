//! The edge agent's configuration.
//!
//! One set of types serves the agent's YAML config file and the `spec` of the
//! `EdgePipeline` Kubernetes resource, so a spec can be copied into a file and
//! back. Field names are camelCase, as Kubernetes users expect.
//!
//! Loading reports problems with the field path (`sources.mqtt[0].subscriptions[1].qos`)
//! and, for syntax and type errors, the file, line and column. Semantic checks
//! ([`AgentConfig::validate`]) collect every problem rather than stopping at the first.

mod bytesize;
mod load;
mod validate;

pub use bytesize::ByteSize;
pub use load::{load_file, parse_str, ConfigError, Problem};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    #[serde(default)]
    pub agent: AgentSection,
    #[serde(default)]
    pub sources: Sources,
    #[serde(default)]
    pub buffer: BufferConfig,
    pub uplink: UplinkConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentSection {
    /// The agent or site name this agent expects its client certificate to
    /// carry. When set, the agent will not connect with a certificate for
    /// another identity (it keeps buffering and reports why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Directory of the durable buffer. Must survive restarts (a hostPath on K3s).
    #[serde(default = "default_data_dir")]
    pub data_dir: String,
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            id: None,
            data_dir: default_data_dir(),
        }
    }
}

fn default_data_dir() -> String {
    "/var/lib/edgefleet/agent".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Sources {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mqtt: Vec<MqttSource>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub can: Vec<CanSource>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candump_replay: Vec<CandumpReplaySource>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MqttSource {
    /// Name of the source; becomes the records' `source` field. Unique.
    #[serde(default = "default_mqtt_name")]
    pub name: String,
    pub host: String,
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    /// Client id; with `cleanSession: false` the broker keeps the session
    /// (subscriptions and unacknowledged QoS 1 messages) under this id.
    /// When the agent follows an `EdgePipeline` (one spec for every gateway
    /// of a site), `{node}` is replaced by the Kubernetes node name, and an
    /// id without `{node}` gets `-<node name>` appended, so two gateways
    /// never share (and keep taking over) one broker session.
    pub client_id: String,
    #[serde(default)]
    pub clean_session: bool,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// File holding the password (kept out of the config so it can be a Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<MqttTls>,
    /// Share the subscriptions among every agent using this group name
    /// (MQTT shared subscriptions, `$share/<group>/<topic>`): the broker
    /// hands each message to one of them. Without it each gateway of a site
    /// receives, and stores, every message. Mosquitto, EMQX, HiveMQ and
    /// VerneMQ support it, also for MQTT 3.1.1 clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_group: Option<String>,
    pub subscriptions: Vec<Subscription>,
}

fn default_mqtt_name() -> String {
    "mqtt".into()
}
fn default_mqtt_port() -> u16 {
    1883
}
fn default_keep_alive() -> u16 {
    30
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MqttTls {
    /// CA bundle to verify the broker with.
    pub ca_file: String,
    /// Client certificate and key, when the broker wants one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subscription {
    /// MQTT topic filter, e.g. `devices/+/telemetry`.
    pub topic: String,
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Pattern that names the device: topic levels are matched one to one and
    /// `{device}` takes the device id, e.g. `devices/{device}/telemetry`.
    /// Without it the whole topic is the device id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_from_topic: Option<String>,
    #[serde(default)]
    pub payload: PayloadFormat,
    /// Content type recorded for raw payloads.
    #[serde(default = "default_content_type")]
    pub content_type: String,
}

fn default_qos() -> u8 {
    1
}
fn default_content_type() -> String {
    "application/octet-stream".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum PayloadFormat {
    /// A JSON object: numbers, bools and strings become signals, nested objects
    /// are flattened to dotted names. A numeric `ts` (ms) or `timestamp_ns` field
    /// sets the record's time.
    #[default]
    Json,
    /// The payload as bytes, undecoded.
    Raw,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CanSource {
    /// SocketCAN interface, e.g. `can0`. Becomes the records' `source`.
    pub interface: String,
    /// DBC files used to decode this interface's frames.
    #[serde(default)]
    pub dbc: Vec<String>,
    /// What to do with frames no DBC describes. Always counted.
    #[serde(default)]
    pub unknown_frames: UnknownFrames,
    /// Kernel receive filters; none means every frame.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<CanFilter>,
    /// Accept CAN FD frames.
    #[serde(default)]
    pub fd: bool,
    #[serde(default)]
    pub reduction: Reduction,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CandumpReplaySource {
    /// A `candump -L` log file.
    pub file: String,
    /// Source name for the records; by default the interface named in the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default)]
    pub dbc: Vec<String>,
    /// 1.0 replays at recorded speed, 10.0 ten times faster, 0 as fast as possible.
    #[serde(default = "default_speed")]
    pub speed: f64,
    #[serde(default, rename = "loop")]
    pub repeat: bool,
    #[serde(default)]
    pub unknown_frames: UnknownFrames,
    #[serde(default)]
    pub reduction: Reduction,
}

fn default_speed() -> f64 {
    1.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum UnknownFrames {
    /// Send the frame as raw bytes (`application/x-can-frame`).
    #[default]
    Raw,
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CanFilter {
    pub id: u32,
    #[serde(default = "default_mask")]
    pub mask: u32,
    #[serde(default)]
    pub extended: bool,
}

fn default_mask() -> u32 {
    0x1FFF_FFFF
}

/// Per-signal reduction, so a 1 kHz bus does not become 1 kHz of uplink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Reduction {
    #[serde(default)]
    pub default: ReductionRule,
    /// Overrides by signal name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub signals: std::collections::BTreeMap<String, ReductionRule>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReductionRule {
    /// Emit a signal only when its value changed.
    #[serde(default)]
    pub on_change: bool,
    /// Emit only when the value moved by more than this (absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadband: Option<f64>,
    /// Emit a signal at most this often.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_interval_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BufferConfig {
    /// Cap on the bytes the buffer stores, e.g. `512MiB`: records as stored,
    /// zstd-compressed when that makes them smaller, so telemetry usually
    /// takes a fifth of its encoded size; an append is judged at its
    /// uncompressed size.
    #[serde(default = "default_buffer_bytes")]
    pub max_bytes: ByteSize,
    #[serde(default)]
    pub when_full: FullPolicy,
    #[serde(default)]
    pub flush: FlushPolicy,
    /// How many undecodable payloads to keep for inspection.
    #[serde(default = "default_dead_letters")]
    pub dead_letter_max: u32,
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            max_bytes: default_buffer_bytes(),
            when_full: FullPolicy::default(),
            flush: FlushPolicy::default(),
            dead_letter_max: default_dead_letters(),
        }
    }
}

fn default_buffer_bytes() -> ByteSize {
    ByteSize(1 << 30)
}
fn default_dead_letters() -> u32 {
    1000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum FullPolicy {
    /// Delete the oldest unsent records to make room (counted as drops).
    DropOldest,
    /// Stop accepting: sources stop acknowledging, so the MQTT broker keeps the
    /// data until there is room again.
    #[default]
    Block,
}

/// When buffered records are forced to disk. Records are acknowledged to
/// their source (the MQTT broker) only after they are on disk, whatever the
/// setting: these knobs trade latency for fewer fsyncs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FlushPolicy {
    /// Longest a record waits for others to share its fsync (group commit).
    #[serde(default = "default_flush_delay")]
    pub max_delay_ms: u64,
    /// A group is written at once when it holds this many records.
    #[serde(default = "default_flush_records")]
    pub max_batch_records: u32,
}

impl Default for FlushPolicy {
    fn default() -> Self {
        Self {
            max_delay_ms: default_flush_delay(),
            max_batch_records: default_flush_records(),
        }
    }
}

fn default_flush_delay() -> u64 {
    4
}
fn default_flush_records() -> u32 {
    50_000
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UplinkConfig {
    /// The ingest's address, e.g. `https://ingest.example.com:7443`.
    pub endpoint: String,
    /// Name to verify the ingest's certificate against, when it differs from
    /// the endpoint's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    pub ca_file: String,
    pub cert_file: String,
    pub key_file: String,
    #[serde(default)]
    pub batch: BatchConfig,
    /// How batches travel: `zstd` compresses each batch's records inside the
    /// message with one context for the whole stream (batches under 16 KiB
    /// go as they are); `gzip` uses gRPC's message compression; `none`.
    #[serde(default)]
    pub compression: Compression,
    #[serde(default)]
    pub backoff: BackoffConfig,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Reconnect when the ingest has not acknowledged an outstanding batch for this long.
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_ms: u64,
    #[serde(default = "default_keepalive")]
    pub keepalive_ms: u64,
}

fn default_connect_timeout() -> u64 {
    5_000
}
fn default_ack_timeout() -> u64 {
    30_000
}
fn default_keepalive() -> u64 {
    20_000
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BatchConfig {
    #[serde(default = "default_batch_records")]
    pub max_records: u32,
    #[serde(default = "default_batch_bytes")]
    pub max_bytes: ByteSize,
    /// How long a partial batch waits for more records before it is sent,
    /// when at least half the ingest's credit window is in flight (with
    /// credit to spare a partial batch is sent at once).
    #[serde(default = "default_batch_delay")]
    pub max_delay_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_records: default_batch_records(),
            max_bytes: default_batch_bytes(),
            max_delay_ms: default_batch_delay(),
        }
    }
}

fn default_batch_records() -> u32 {
    2_000
}
fn default_batch_bytes() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_batch_delay() -> u64 {
    5
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum Compression {
    None,
    Gzip,
    #[default]
    Zstd,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackoffConfig {
    #[serde(default = "default_backoff_initial")]
    pub initial_ms: u64,
    #[serde(default = "default_backoff_max")]
    pub max_ms: u64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial_ms: default_backoff_initial(),
            max_ms: default_backoff_max(),
        }
    }
}

fn default_backoff_initial() -> u64 {
    200
}
fn default_backoff_max() -> u64 {
    30_000
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the Prometheus `/metrics` and `/healthz`, `/readyz` endpoints.
    /// Empty disables them.
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: default_metrics_listen(),
        }
    }
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9464".into()
}

impl AgentConfig {
    /// Hex SHA-256 of the configuration's canonical JSON form: equal configs
    /// hash equal whatever their formatting, so operators can tell which
    /// configuration an agent runs.
    pub fn hash(&self) -> String {
        use sha2::Digest;
        let canonical = serde_json::to_vec(self).expect("config serialises");
        hex::encode(sha2::Sha256::digest(canonical))
    }

    /// The configuration as the agent on Kubernetes node `node` runs it:
    /// MQTT client ids made unique per node (see [`MqttSource::client_id`]).
    /// [`hash`](Self::hash) stays that of the shared configuration.
    pub fn for_node(&self, node: &str) -> AgentConfig {
        let mut config = self.clone();
        for mqtt in &mut config.sources.mqtt {
            mqtt.client_id = if mqtt.client_id.contains(NODE_PLACEHOLDER) {
                mqtt.client_id.replace(NODE_PLACEHOLDER, node)
            } else {
                format!("{}-{node}", mqtt.client_id)
            };
        }
        config
    }
}

/// Replaced by the node name in MQTT client ids (see [`AgentConfig::for_node`]).
pub const NODE_PLACEHOLDER: &str = "{node}";

#[cfg(test)]
mod node_tests {
    use super::*;

    #[test]
    fn client_ids_become_unique_per_node() {
        let config: AgentConfig = serde_yaml_ng::from_str(
            "sources:\n  mqtt:\n    - {host: a, clientId: 'gw-{node}-x', subscriptions: [{topic: t}]}\n    - {name: b, host: a, clientId: site, subscriptions: [{topic: t}]}\nuplink: {endpoint: 'https://i:1', caFile: c, certFile: c, keyFile: k}\n",
        )
        .unwrap();
        let node = config.for_node("gw-7");
        assert_eq!(node.sources.mqtt[0].client_id, "gw-gw-7-x");
        assert_eq!(node.sources.mqtt[1].client_id, "site-gw-7");
        assert_eq!(config.sources.mqtt[0].client_id, "gw-{node}-x");
    }
}
