//! The library's error type. Every variant names what it is about (a file,
//! an address, the store) so that `main` can print it as is.

use std::net::SocketAddr;

use crate::sink::SinkError;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("TLS setup: {0}")]
    Pki(#[from] edgefleet_pki::PkiError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the committer thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("gRPC server ({what}): {source}")]
    Server {
        what: &'static str,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("internal error: {0}")]
    Internal(String),
}
