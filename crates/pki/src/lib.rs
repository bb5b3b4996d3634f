//! Certificates for edgefleet's mutual TLS.
//!
//! * [`dev`]: a development PKI made with rcgen (CA, ingest server certificate,
//!   one client certificate per agent), so a new user runs with mTLS from the
//!   first minute.
//! * [`load`]: reading PEM files with errors that name the file.
//! * [`identity`]: the agent identity a client certificate carries. The ingest
//!   trusts only this, never what an agent says about itself.
//! * [`server_tls_config`]: the ingest's rustls configuration, which requires and
//!   verifies client certificates.

pub mod dev;
pub mod identity;
pub mod load;

use std::path::PathBuf;
use std::sync::Arc;

pub use identity::{agent_identity, CertIdentity, Principal, AGENT_URI_PREFIX, SITE_URI_PREFIX};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    BadPem { path: PathBuf, what: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("certificate has no usable agent identity: {0}")]
    NoIdentity(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    #[error("invalid agent id `{0}`: use letters, digits, '.', '_' and '-' only (and `<node>@<site>` for a gateway of a site)")]
    BadAgentId(String),
    #[error("not authorised: {0}")]
    NotAuthorised(String),
}

/// The ingest's TLS configuration: its own certificate chain and key, and a
/// verifier that requires a client certificate signed by `client_ca`.
/// ALPN is h2 only: the service speaks gRPC.
pub fn server_tls_config(
    cert_chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    client_ca: Vec<rustls::pki_types::CertificateDer<'static>>,
) -> Result<rustls::ServerConfig, PkiError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in client_ca {
        roots.add(ca)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| PkiError::Verifier(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert_chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A certificate's agent or site name. Names end up in file names, metric
/// labels and store keys: keep them tame.
pub fn check_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadAgentId(name.to_string()))
    }
}

/// A stream's agent id: an agent's name, or `<node>@<site>` for a gateway
/// holding its site's certificate (see [`identity`]).
pub fn check_agent_id(id: &str) -> Result<(), PkiError> {
    let parts_ok = match id.split_once('@') {
        Some((node, site)) => check_name(node).is_ok() && check_name(site).is_ok(),
        None => check_name(id).is_ok(),
    };
    if parts_ok {
        Ok(())
    } else {
        Err(PkiError::BadAgentId(id.to_string()))
    }
}
