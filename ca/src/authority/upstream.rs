//! Running under an organisation's existing root: ztid's X.509 authorities are then
//! intermediates signed by an upstream CA (certificate on disk; key on disk or in
//! the configured key manager, e.g. a PKCS#11 token). Workloads get the full chain,
//! and the bundle holds the upstream root, so relying parties that already trust the
//! organisation's root need nothing new.

use std::sync::Arc;

use rcgen::{Issuer, PublicKeyData, SignatureAlgorithm};
use x509_parser::prelude::{FromDer, X509Certificate};
use ztid_hsm::KeyManager;

use super::key::ManagedKey;
use crate::config::UpstreamConfig;
use crate::{Error, Result};

/// The upstream CA's signing key.
pub enum UpstreamKey {
    /// A PKCS#8 key read from disk (boxed: a key pair is far larger than the other variant).
    File(Box<rcgen::KeyPair>),
    /// A key in the server's key manager.
    Managed(ManagedKey),
}

impl PublicKeyData for UpstreamKey {
    fn der_bytes(&self) -> &[u8] {
        match self {
            UpstreamKey::File(k) => k.der_bytes(),
            UpstreamKey::Managed(k) => k.der_bytes(),
        }
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        match self {
            UpstreamKey::File(k) => k.algorithm(),
            UpstreamKey::Managed(k) => PublicKeyData::algorithm(k),
        }
    }
}

impl rcgen::SigningKey for UpstreamKey {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        match self {
            UpstreamKey::File(k) => rcgen::SigningKey::sign(k.as_ref(), msg),
            UpstreamKey::Managed(k) => rcgen::SigningKey::sign(k, msg),
        }
    }
}

/// The upstream CA, ready to sign ztid's intermediates.
pub struct Upstream {
    /// Issuer built from the upstream CA certificate and its key.
    pub issuer: Issuer<'static, UpstreamKey>,
    /// Certificates between ztid's intermediate and the root (the upstream CA first,
    /// self-signed roots excluded), DER.
    pub chain: Vec<Vec<u8>>,
    /// The roots relying parties trust (the bundle's X.509 authorities), DER.
    pub roots: Vec<Vec<u8>>,
    /// `notAfter` of the upstream CA certificate: ztid's intermediates never outlive it.
    pub not_after: i64,
}

fn is_self_signed(der: &[u8]) -> bool {
    X509Certificate::from_der(der)
        .is_ok_and(|(_, c)| c.subject() == c.issuer() && c.verify_signature(None).is_ok())
}

fn read_certs(path: &std::path::Path) -> Result<Vec<Vec<u8>>> {
    let text =
        std::fs::read_to_string(path).map_err(Error::io(format!("reading {}", path.display())))?;
    ztid_spiffe::svid::certs_from_pem(&text)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

impl Upstream {
    /// Loads the upstream CA and checks that its key matches its certificate.
    pub fn load(cfg: &UpstreamConfig, key_manager: &Arc<dyn KeyManager>) -> Result<Self> {
        let certs = read_certs(&cfg.cert)?;
        let ca = certs
            .first()
            .ok_or_else(|| Error::Config("upstream cert file is empty".into()))?
            .clone();
        let (_, parsed) = X509Certificate::from_der(&ca)
            .map_err(|e| Error::Config(format!("upstream certificate: {e}")))?;
        if !parsed.is_ca() {
            return Err(Error::Config("the upstream certificate is not a CA".into()));
        }
        let not_after = parsed.validity().not_after.timestamp();
        let cert_spki = parsed.public_key().raw.to_vec();
        let key = match (&cfg.key_file, &cfg.key_id) {
            (Some(path), None) => {
                let pem = zeroize::Zeroizing::new(
                    std::fs::read_to_string(path)
                        .map_err(Error::io(format!("reading {}", path.display())))?,
                );
                UpstreamKey::File(Box::new(rcgen::KeyPair::from_pem(&pem).map_err(|e| {
                    Error::Config(format!("upstream key {}: {e}", path.display()))
                })?))
            }
            (None, Some(id)) => UpstreamKey::Managed(ManagedKey::load(key_manager.clone(), id)?),
            _ => {
                return Err(Error::Config(
                    "[upstream] needs exactly one of key_file or key_id".into(),
                ))
            }
        };
        if key.subject_public_key_info() != cert_spki {
            return Err(Error::Config(
                "the upstream key does not match the upstream certificate".into(),
            ));
        }
        let roots = match &cfg.bundle {
            Some(p) => read_certs(p)?,
            None => {
                let r: Vec<_> = certs
                    .iter()
                    .filter(|c| is_self_signed(c))
                    .cloned()
                    .collect();
                if r.is_empty() {
                    return Err(Error::Config(
                        "no self-signed root in the upstream cert file; set [upstream] bundle"
                            .into(),
                    ));
                }
                r
            }
        };
        let chain = certs.into_iter().filter(|c| !is_self_signed(c)).collect();
        let issuer = Issuer::from_ca_cert_der(&ca.into(), key)?;
        Ok(Self {
            issuer,
            chain,
            roots,
            not_after,
        })
    }
}
