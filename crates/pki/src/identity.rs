//! Who a client certificate speaks for.
//!
//! Two kinds of certificate are accepted:
//!
//! * an **agent** certificate (`urn:edgefleet:agent:<id>` URI SAN, or else the
//!   common name) names exactly one agent; it streams as `<id>`;
//! * a **site** certificate (`urn:edgefleet:site:<site>` URI SAN) is shared by
//!   every gateway of a site (one Kubernetes Secret for a DaemonSet), and each
//!   gateway streams as `<node>@<site>`. Sessions, supersede and the ingest's
//!   exactly-once sequence are per stream id, so two gateways of one site
//!   never take each other's place or sequence numbers. The trust boundary
//!   is the site: any holder of the site's key may speak for any node of it.
//!
//! Certificate names never contain `@`, so no agent certificate can name a
//! stream of a site.

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::PkiError;

/// Agent certificates carry their identity as a URI SAN `urn:edgefleet:agent:<id>`.
pub const AGENT_URI_PREFIX: &str = "urn:edgefleet:agent:";
/// Site certificates carry `urn:edgefleet:site:<site>`.
pub const SITE_URI_PREFIX: &str = "urn:edgefleet:site:";

/// The principal a certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// One agent, streaming as this id.
    Agent(String),
    /// Every gateway of this site, each streaming as `<node>@<site>`.
    Site(String),
}

impl Principal {
    /// The stream id a session may use when its `Hello` claims `claimed`
    /// (empty: no claim), or why not.
    pub fn authorise(&self, claimed: &str) -> Result<String, PkiError> {
        match self {
            Principal::Agent(id) if claimed.is_empty() || claimed == id => Ok(id.clone()),
            Principal::Agent(id) => Err(PkiError::NotAuthorised(format!(
                "hello claims agent `{claimed}` but the certificate identifies agent `{id}`"
            ))),
            Principal::Site(site) => match claimed.split_once('@') {
                Some((node, claimed_site)) if claimed_site == site => {
                    crate::check_name(node).map_err(|_| {
                        PkiError::NotAuthorised(format!(
                            "hello claims `{claimed}`: `{node}` is not a valid node name"
                        ))
                    })?;
                    Ok(claimed.to_string())
                }
                _ => Err(PkiError::NotAuthorised(format!(
                    "hello claims `{claimed}` but the certificate is site `{site}`'s, \
                     which streams only as `<node>@{site}`"
                ))),
            },
        }
    }

    /// The stream id an agent running on `node` uses with this certificate.
    pub fn stream_id(&self, node: &str) -> String {
        match self {
            Principal::Agent(id) => id.clone(),
            Principal::Site(site) => format!("{node}@{site}"),
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Agent(id) => write!(f, "agent {id}"),
            Principal::Site(site) => write!(f, "site {site}"),
        }
    }
}

/// What a client certificate says, with its validity bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    pub principal: Principal,
    /// Seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
}

/// The principal of a DER client certificate: its `urn:edgefleet:site:` or
/// `urn:edgefleet:agent:` URI SAN if it has one, otherwise the subject's
/// common name as an agent id.
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
                GeneralName::URI(uri) => {
                    if let Some(site) = uri.strip_prefix(SITE_URI_PREFIX) {
                        Some(Principal::Site(site.to_string()))
                    } else {
                        uri.strip_prefix(AGENT_URI_PREFIX)
                            .map(|id| Principal::Agent(id.to_string()))
                    }
                }
                _ => None,
            })
        });
    let principal = match from_san {
        Some(principal) => principal,
        None => Principal::Agent(
            cert.subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_string)
                .ok_or_else(|| {
                    PkiError::NoIdentity("neither an edgefleet URI SAN nor a common name".into())
                })?,
        ),
    };
    let (Principal::Agent(name) | Principal::Site(name)) = &principal;
    crate::check_name(name)
        .map_err(|_| PkiError::NoIdentity(format!("`{name}` is not a valid {principal}")))?;
    Ok(CertIdentity {
        principal,
        not_before: bounds.0,
        not_after: bounds.1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_certificates_authorise_their_own_id_only() {
        let agent = Principal::Agent("gw-1".into());
        assert_eq!(agent.authorise("").unwrap(), "gw-1");
        assert_eq!(agent.authorise("gw-1").unwrap(), "gw-1");
        let err = agent.authorise("gw-2").unwrap_err().to_string();
        assert!(err.contains("gw-2") && err.contains("gw-1"), "{err}");
        assert_eq!(agent.stream_id("node-a"), "gw-1");
    }

    #[test]
    fn site_certificates_authorise_each_node_of_their_site() {
        let site = Principal::Site("plant-7".into());
        assert_eq!(site.stream_id("node-a"), "node-a@plant-7");
        assert_eq!(site.authorise("node-a@plant-7").unwrap(), "node-a@plant-7");
        assert_eq!(site.authorise("node-b@plant-7").unwrap(), "node-b@plant-7");
        for refused in [
            "",
            "plant-7",
            "node-a@plant-8",
            "@plant-7",
            "a b@plant-7",
            "x@y@plant-7",
        ] {
            let err = site.authorise(refused).unwrap_err().to_string();
            assert!(err.contains("plant-7"), "{refused:?}: {err}");
        }
    }
}
