use std::path::Path;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::PkiError;

fn read(path: &Path) -> Result<Vec<u8>, PkiError> {
    std::fs::read(path).map_err(|source| PkiError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM file; an error if there is none.
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let pem = read(path)?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut pem.as_slice()).collect();
    let certs = certs.map_err(|e| PkiError::BadPem {
        path: path.to_path_buf(),
        what: format!("malformed PEM: {e}"),
    })?;
    if certs.is_empty() {
        return Err(PkiError::BadPem {
            path: path.to_path_buf(),
            what: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| PkiError::BadPem {
            path: path.to_path_buf(),
            what: format!("malformed PEM: {e}"),
        })?
        .ok_or_else(|| PkiError::BadPem {
            path: path.to_path_buf(),
            what: "no PRIVATE KEY block found".into(),
        })
}

/// The raw PEM text, checked to hold at least one certificate (for tonic,
/// which takes PEM bytes).
pub fn cert_pem(path: &Path) -> Result<Vec<u8>, PkiError> {
    certs(path)?;
    read(path)
}

/// The raw PEM text, checked to hold a private key.
pub fn key_pem(path: &Path) -> Result<Vec<u8>, PkiError> {
    private_key(path)?;
    read(path)
}
