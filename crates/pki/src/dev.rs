//! A development PKI. Not for production: keys are written unencrypted and the
//! CA key sits next to the certificates. Production fleets sign agent
//! certificates with their own CA (see deploy/k3s's cert-manager objects).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::{check_name, PkiError, AGENT_URI_PREFIX, SITE_URI_PREFIX};

/// Where `init` put things.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub dir: PathBuf,
}

impl DevPki {
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("ingest.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("ingest.key")
    }
    pub fn agent_cert(&self, id: &str) -> PathBuf {
        self.dir.join("agents").join(format!("{id}.pem"))
    }
    pub fn agent_key(&self, id: &str) -> PathBuf {
        self.dir.join("agents").join(format!("{id}.key"))
    }
    pub fn site_cert(&self, site: &str) -> PathBuf {
        self.dir.join("sites").join(format!("{site}.pem"))
    }
    pub fn site_key(&self, site: &str) -> PathBuf {
        self.dir.join("sites").join(format!("{site}.key"))
    }
}

/// Validity window of an issued certificate.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clock skew) for `days` days.
    pub fn days(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days),
        }
    }
    /// A window that ended yesterday, for tests of expired certificates.
    pub fn expired() -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::days(30),
            not_after: now - Duration::days(1),
        }
    }
}

/// Makes a CA, an ingest server certificate for `server_names` (DNS names or
/// IP addresses) and one client certificate per agent id in `dir`.
pub fn init(dir: &Path, agent_ids: &[String], server_names: &[String]) -> Result<DevPki, PkiError> {
    for id in agent_ids {
        check_name(id)?;
    }
    let pki = DevPki {
        dir: dir.to_path_buf(),
    };
    create_dir(dir)?;
    create_dir(&dir.join("agents"))?;

    let ca_key = KeyPair::generate()?;
    let ca_params = ca_params("edgefleet development CA")?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write(&pki.ca_cert(), ca_cert.pem())?;
    write_secret(&pki.ca_key(), ca_key.serialize_pem())?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(server_names.to_vec())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "edgefleet cloud-ingest");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let v = Validity::days(365);
    params.not_before = v.not_before;
    params.not_after = v.not_after;
    let server = params.signed_by(&server_key, &issuer)?;
    write(&pki.server_cert(), server.pem())?;
    write_secret(&pki.server_key(), server_key.serialize_pem())?;

    for id in agent_ids {
        let (cert, key) = client_cert(
            id,
            &format!("{AGENT_URI_PREFIX}{id}"),
            Validity::days(365),
            &issuer,
        )?;
        write(&pki.agent_cert(id), cert)?;
        write_secret(&pki.agent_key(id), key)?;
    }
    Ok(pki)
}

/// Issues one more agent certificate from the CA in `pki` (for `certs add-agent`
/// and for tests that need odd validity windows).
pub fn issue_agent(pki: &DevPki, id: &str, validity: Validity) -> Result<(), PkiError> {
    check_name(id)?;
    let ca_pem = read_string(&pki.ca_cert())?;
    let ca_key = KeyPair::from_pem(&read_string(&pki.ca_key())?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let (cert, key) = client_cert(id, &format!("{AGENT_URI_PREFIX}{id}"), validity, &issuer)?;
    create_dir(&pki.dir.join("agents"))?;
    write(&pki.agent_cert(id), cert)?;
    write_secret(&pki.agent_key(id), key)
}

/// Issues a site certificate (`urn:edgefleet:site:<site>`), shared by every
/// gateway of the site; each streams as `<node>@<site>` (see
/// [`crate::identity`]).
pub fn issue_site(pki: &DevPki, site: &str, validity: Validity) -> Result<(), PkiError> {
    check_name(site)?;
    let ca_pem = read_string(&pki.ca_cert())?;
    let ca_key = KeyPair::from_pem(&read_string(&pki.ca_key())?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let (cert, key) = client_cert(
        &format!("site {site}"),
        &format!("{SITE_URI_PREFIX}{site}"),
        validity,
        &issuer,
    )?;
    create_dir(&pki.dir.join("sites"))?;
    write(&pki.site_cert(site), cert)?;
    write_secret(&pki.site_key(site), key)
}

fn ca_params(name: &str) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let v = Validity::days(3650);
    params.not_before = v.not_before;
    params.not_after = v.not_after;
    Ok(params)
}

fn client_cert(
    common_name: &str,
    uri: &str,
    validity: Validity,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.subject_alt_names = vec![SanType::URI(uri.to_string().try_into()?)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

fn read_string(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, text: String) -> Result<(), PkiError> {
    std::fs::write(path, text).map_err(|source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Private keys are readable by their owner only.
fn write_secret(path: &Path, text: String) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    file.write_all(text.as_bytes()).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_certificates_carry_their_identity() {
        let dir = tempfile_dir();
        let pki = init(
            &dir,
            &["gw-1".into()],
            &["localhost".into(), "127.0.0.1".into()],
        )
        .unwrap();
        let der = crate::load::certs(&pki.agent_cert("gw-1")).unwrap();
        let identity = crate::agent_identity(&der[0]).unwrap();
        assert_eq!(identity.principal, crate::Principal::Agent("gw-1".into()));
        assert!(identity.not_after > identity.not_before);

        issue_agent(&pki, "gw-old", Validity::expired()).unwrap();
        let der = crate::load::certs(&pki.agent_cert("gw-old")).unwrap();
        let identity = crate::agent_identity(&der[0]).unwrap();
        assert!(identity.not_after < OffsetDateTime::now_utc().unix_timestamp());

        issue_site(&pki, "plant-7", Validity::days(30)).unwrap();
        let der = crate::load::certs(&pki.site_cert("plant-7")).unwrap();
        let identity = crate::agent_identity(&der[0]).unwrap();
        assert_eq!(identity.principal, crate::Principal::Site("plant-7".into()));
        // A name with `@` would collide with a site's streams.
        assert!(matches!(
            issue_agent(&pki, "gw-1@plant-7", Validity::days(1)),
            Err(PkiError::BadAgentId(_))
        ));

        // The server chain and key make a valid rustls config with client auth.
        let config = crate::server_tls_config(
            crate::load::certs(&pki.server_cert()).unwrap(),
            crate::load::private_key(&pki.server_key()).unwrap(),
            crate::load::certs(&pki.ca_cert()).unwrap(),
        );
        assert!(config.is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_ids_and_missing_pem_blocks_are_named() {
        let dir = tempfile_dir();
        assert!(matches!(
            init(&dir, &["a b".into()], &[]),
            Err(PkiError::BadAgentId(_))
        ));
        let path = dir.join("empty.pem");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&path, "nothing here").unwrap();
        let err = crate::load::certs(&path).unwrap_err().to_string();
        assert!(
            err.contains("empty.pem") && err.contains("no CERTIFICATE"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "edgefleet-pki-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn rand_suffix() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    }
}
