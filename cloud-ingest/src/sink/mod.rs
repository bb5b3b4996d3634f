//! The seam between the ingest and where records end up.
//!
//! A sink stores records and each agent's high-water mark (the highest
//! sequence number stored). Deduplication happens once, in the committer,
//! before a sink sees the records: every sink therefore gets exactly-once
//! storage by implementing two methods. Each sink is one module here.

pub mod discard;
pub mod embedded;

use std::path::PathBuf;

use edgefleet_proto::batch_zstd::KeptFrames;
use prost::bytes::Bytes;

pub use discard::DiscardSink;
pub use embedded::EmbeddedStore;

/// A record as the agent sent it: an encoded `edgefleet.telemetry.v1.Record`
/// that `encoded::check_record` accepted, and the `seq` it carries. Sinks
/// store or forward the encoding as it is; nothing on the way decodes it.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedRecord {
    pub seq: u64,
    pub encoded: Bytes,
}

/// One agent's records for one commit: new (never stored) records in
/// strictly increasing `seq` order.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRecords {
    pub agent: String,
    pub records: Vec<EncodedRecord>,
    /// The agent's compressed frames of exactly these records, when it sent
    /// frames that read back to them ([`KeptFrames`]): a sink may store
    /// them as they are instead of compressing `records` again.
    pub kept: Option<KeptFrames>,
}

/// A durable destination for records.
///
/// Called from blocking threads (the committer and `spawn_blocking`), never
/// on an async executor thread, so implementations may block.
pub trait Sink: Send + Sync + 'static {
    /// Highest sequence number durably stored for `agent`; 0 when none.
    fn stored_through(&self, agent: &str) -> Result<u64, SinkError>;

    /// Stores these records and each agent's new high-water mark (the last
    /// `seq` of its records) atomically and durably; returns only when durable.
    /// One agent may appear more than once, in seq order.
    fn commit(&self, batches: &[AgentRecords]) -> Result<(), SinkError>;
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("no store at {path} (expected a directory made by `cloud-ingest serve --store`)")]
    NoStore { path: PathBuf },
    #[error(
        "the store {path} is in use by a running cloud-ingest (sled allows one process per store); \
         ask the running server instead: {hint}"
    )]
    Locked { path: PathBuf, hint: String },
    #[error("cannot open the store {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("store {path} is unavailable: {reason}")]
    Unavailable { path: PathBuf, reason: String },
    #[error("store {path}: corrupt entry {what}: {reason}")]
    Corrupt {
        path: PathBuf,
        what: String,
        reason: String,
    },
}
