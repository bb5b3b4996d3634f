use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::PkiError;

/// Agent certificates carry their identity as a URI SAN `urn:edgefleet:agent:<id>`.
pub const AGENT_URI_PREFIX: &str = "urn:edgefleet:agent:";

/// What an agent's certificate says the agent is, with validity bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    pub agent_id: String,
    /// Seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
}

/// The agent id in a DER client certificate: the `urn:edgefleet:agent:` URI
/// SAN if there is one, otherwise the subject's common name.
pub fn agent_identity(der: &[u8]) -> Result<CertIdentity, PkiError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| PkiError::NoIdentity(format!("unparsable certificate: {e}")))?;
    let validity = cert.validity();
    let bounds = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    let from_san = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|name| match name {
                GeneralName::URI(uri) => uri.strip_prefix(AGENT_URI_PREFIX).map(str::to_string),
                _ => None,
            })
        });
    let id = match from_san {
        Some(id) => id,
        None => cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string)
            .ok_or_else(|| {
                PkiError::NoIdentity("neither an agent URI SAN nor a common name".into())
            })?,
    };
    crate::check_agent_id(&id)
        .map_err(|_| PkiError::NoIdentity(format!("`{id}` is not a valid agent id")))?;
    Ok(CertIdentity {
        agent_id: id,
        not_before: bounds.0,
        not_after: bounds.1,
    })
}
