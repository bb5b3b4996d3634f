//! edgefleet cloud ingest: receives telemetry from edge agents over a
//! mutually authenticated gRPC stream (`edgefleet.telemetry.v1`) and stores
//! it exactly once.
//!
//! * [`tls`]: our own TLS accept loop, which logs and counts rejected
//!   handshakes and attaches the certificate's agent id to the connection.
//! * [`session`]: one stream per agent: Hello, validation, the credit window,
//!   in-order acks, supersede, drain.
//! * [`committer`]: group commit across all streams, with deduplication.
//! * [`sink`]: the storage seam; [`sink::embedded`] is the default sled store.
//! * [`query`], [`admin`], [`metrics`]: reading it back and watching it run.
//! * [`server`]: [`serve`], [`Ingest`] and the shutdown order.

pub mod admin;
pub mod committer;
pub mod config;
pub mod error;
pub mod limits;
pub mod malloc;
pub mod metrics;
pub mod query;
pub mod server;
pub mod session;
pub mod sink;
pub mod tls;

pub use config::{EmbeddedConfig, IngestConfig, Retention, SinkConfig, TlsMode};
pub use error::IngestError;
pub use server::{serve, BoundAddrs, Ingest};
pub use tls::AgentConnectInfo;
pub use tokio_util::sync::CancellationToken;
