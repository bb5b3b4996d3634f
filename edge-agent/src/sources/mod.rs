//! Sources: the seam where records enter the agent. A new kind of source is
//! one new file implementing [`Source`].

pub mod can;
pub mod can_records;
pub mod candump_replay;
pub mod fingerprint;
pub mod json;
pub mod mqtt;
mod mqtt_session;
pub mod topic;

use std::sync::Arc;

use edgefleet_buffer::Buffer;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// What a running source gets.
#[derive(Clone)]
pub struct SourceContext {
    pub buffer: Buffer,
    pub metrics: Arc<Metrics>,
    /// Cancelled on shutdown and on reconfiguration.
    pub shutdown: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source {source_name}: {message}")]
    Fatal {
        source_name: String,
        message: String,
    },
}

/// A producer of records. `run` returns when `ctx.shutdown` is cancelled,
/// after everything it acknowledged upstream is durable in the buffer.
/// Transient failures (a broker going away) are retried inside `run`;
/// returning an error means the source cannot work with its configuration.
pub trait Source: Send + 'static {
    fn name(&self) -> &str;
    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>>;
}

/// Every source a configuration asks for.
pub fn from_config(config: &edgefleet_config::AgentConfig) -> Vec<Box<dyn Source>> {
    let mut sources: Vec<Box<dyn Source>> = Vec::new();
    for mqtt in &config.sources.mqtt {
        sources.push(Box::new(mqtt::MqttSource::new(mqtt.clone())));
    }
    for can in &config.sources.can {
        sources.push(Box::new(can::CanSource::new(can.clone())));
    }
    for replay in &config.sources.candump_replay {
        sources.push(Box::new(candump_replay::CandumpReplaySource::new(
            replay.clone(),
        )));
    }
    sources
}
