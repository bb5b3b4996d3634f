//! The edge agent: sources → durable buffer → uplink.
//!
//! * [`sources`]: where records come from (MQTT, CAN). Each source writes to
//!   the [`edgefleet_buffer::Buffer`] and acknowledges upstream only once the
//!   buffer says the record is durable.
//! * [`uplink`]: the one gRPC stream to the ingest; it reads durable records
//!   from the buffer and deletes them only when the ingest acknowledges them.
//! * [`supervisor`]: owns the buffer, starts sources and the uplink from a
//!   configuration and restarts them when the configuration changes, without
//!   ever closing the buffer.
//! * [`metrics`]: Prometheus metrics and the health endpoints.
//! * `pipeline` (feature `kubernetes`): the configuration from an
//!   `EdgePipeline` custom resource, and the agent's state into its status.

pub mod metrics;
#[cfg(feature = "kubernetes")]
pub mod pipeline;
pub mod sources;
pub mod supervisor;
pub mod telemetry;
pub mod uplink;

pub use supervisor::{Agent, AgentError, ConfigFeed};

/// The agent's version, sent in `Hello`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub(crate) fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

/// The kernel's host name, lower-cased: the node name when none is given.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_ascii_lowercase())
        .unwrap_or_default()
}
