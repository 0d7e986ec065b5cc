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

/// Checks that `certs` (the upstream CA first, then up to the root) is one path that
/// ends at one of `roots`: each certificate is issued and signed by the next, the last
/// is a root or is signed by one; every certificate on it is a CA allowed to sign
/// certificates, whose path length constraint leaves room for ztid's intermediate
/// below the upstream CA. Returns the earliest `notAfter` on the path (the root's
/// included), which ztid's intermediates must not outlive.
fn check_path(certs: &[Vec<u8>], roots: &[Vec<u8>]) -> Result<i64> {
    fn parse<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>> {
        X509Certificate::from_der(der)
            .map(|(_, c)| c)
            .map_err(|e| Error::Config(format!("upstream {what}: {e}")))
    }
    let parsed = certs
        .iter()
        .map(|c| parse(c, "certificate"))
        .collect::<Result<Vec<_>>>()?;
    let parsed_roots = roots
        .iter()
        .map(|c| parse(c, "bundle root"))
        .collect::<Result<Vec<_>>>()?;
    let signed_by = |child: &X509Certificate<'_>, parent: &X509Certificate<'_>| {
        child.issuer() == parent.subject()
            && child.verify_signature(Some(parent.public_key())).is_ok()
    };
    let mut path: Vec<&X509Certificate<'_>> = parsed.iter().collect();
    for (i, pair) in parsed.windows(2).enumerate() {
        if let [child, parent] = pair {
            if !signed_by(child, parent) {
                return Err(Error::Config(format!(
                    "the upstream cert file does not chain: certificate {} ({}) is not signed by certificate {} ({})",
                    i + 1,
                    child.subject(),
                    i + 2,
                    parent.subject()
                )));
            }
        }
    }
    let last_der = certs
        .last()
        .ok_or_else(|| Error::Config("upstream cert file is empty".into()))?;
    let last = path
        .last()
        .copied()
        .ok_or_else(|| Error::Config("upstream cert file is empty".into()))?;
    if !roots.iter().any(|r| r == last_der) {
        let Some(root) = parsed_roots.iter().find(|r| signed_by(last, r)) else {
            return Err(Error::Config(format!(
                "the upstream chain does not reach a root of the bundle: no root signed {}",
                last.subject()
            )));
        };
        path.push(root);
    }
    for (i, c) in path.iter().enumerate() {
        if !c.is_ca() {
            return Err(Error::Config(format!(
                "upstream certificate {} is not a CA",
                c.subject()
            )));
        }
        if let Ok(Some(ku)) = c.key_usage() {
            if !ku.value.key_cert_sign() {
                return Err(Error::Config(format!(
                    "upstream certificate {} may not sign certificates (no keyCertSign)",
                    c.subject()
                )));
            }
        }
        // Below certificate i: the i upstream CAs before it and ztid's intermediate.
        if let Ok(Some(bc)) = c.basic_constraints() {
            if let Some(max) = bc.value.path_len_constraint {
                if u64::from(max) < i as u64 + 1 {
                    return Err(Error::Config(format!(
                        "upstream certificate {} has pathLenConstraint {max}: it cannot issue ztid's intermediate CA",
                        c.subject()
                    )));
                }
            }
        }
    }
    Ok(path
        .iter()
        .map(|c| c.validity().not_after.timestamp())
        .min()
        .unwrap_or(i64::MIN))
}

/// Reads a private key file that others may not access (any `o` permission bit is
/// refused, as for the PKCS#11 PIN file); mode and content come from one open file.
fn read_private_file(path: &std::path::Path) -> Result<zeroize::Zeroizing<String>> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display().to_string();
    let mut file = std::fs::File::open(path).map_err(Error::io(format!("reading {shown}")))?;
    let meta = file
        .metadata()
        .map_err(Error::io(format!("reading {shown}")))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        return Err(Error::Config(format!(
            "upstream key {shown} is accessible to others (mode {mode:03o}): run `chmod 600 {shown}`, then start the server again"
        )));
    }
    // Sized up front: a growing String would leave copies of the key behind.
    let size = usize::try_from(meta.len()).unwrap_or(0);
    let mut pem = zeroize::Zeroizing::new(String::with_capacity(size.saturating_add(1)));
    file.read_to_string(&mut pem)
        .map_err(Error::io(format!("reading {shown}")))?;
    Ok(pem)
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
                let pem = read_private_file(path)?;
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
        let not_after = check_path(&certs, &roots)?.min(not_after);
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    use ztid_hsm::SoftwareKeyManager;

    use super::*;

    struct Ca {
        params: CertificateParams,
        key: KeyPair,
        der: Vec<u8>,
        pem: String,
    }

    fn ca(name: &str, constraint: BasicConstraints, parent: Option<&Ca>) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(constraint);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = match parent {
            Some(p) => {
                let issuer = Issuer::from_params(&p.params, &p.key);
                params.signed_by(&key, &issuer).unwrap()
            }
            None => params.self_signed(&key).unwrap(),
        };
        Ca {
            der: cert.der().to_vec(),
            pem: cert.pem(),
            params,
            key,
        }
    }

    fn load(
        dir: &std::path::Path,
        upstream: &Ca,
        file: &[&Ca],
        bundle: Option<&[&Ca]>,
    ) -> Result<Upstream> {
        let pems = |cas: &[&Ca]| cas.iter().map(|c| c.pem.clone()).collect::<String>();
        let cert = dir.join("upstream.pem");
        std::fs::write(&cert, pems(file)).unwrap();
        let key_file = dir.join("upstream.key");
        std::fs::write(&key_file, upstream.key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let bundle = bundle.map(|b| {
            let p = dir.join("bundle.pem");
            std::fs::write(&p, pems(b)).unwrap();
            p
        });
        let km: Arc<dyn KeyManager> = Arc::new(SoftwareKeyManager::open(dir.join("keys")).unwrap());
        Upstream::load(
            &UpstreamConfig {
                cert,
                key_file: Some(key_file),
                key_id: None,
                bundle,
            },
            &km,
        )
    }

    fn config_error(r: Result<Upstream>) -> String {
        match r {
            Err(e @ Error::Config(_)) => e.to_string(),
            Err(e) => panic!("expected a config error, got {e}"),
            Ok(_) => panic!("expected a config error, the upstream loaded"),
        }
    }

    #[test]
    fn a_chain_that_reaches_its_root_loads() {
        let dir = tempfile::tempdir().unwrap();
        let root = ca("root", BasicConstraints::Unconstrained, None);
        let mid = ca(
            "org issuing CA",
            BasicConstraints::Constrained(1),
            Some(&root),
        );
        let u = load(dir.path(), &mid, &[&mid, &root], None).unwrap();
        assert_eq!(u.chain, vec![mid.der.clone()]);
        assert_eq!(u.roots, vec![root.der.clone()]);
        // The root in a separate bundle file does as well.
        let u = load(dir.path(), &mid, &[&mid], Some(&[&root])).unwrap();
        assert_eq!(u.roots, vec![root.der.clone()]);
    }

    #[test]
    fn upstream_chain_that_does_not_chain_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = ca("root", BasicConstraints::Unconstrained, None);
        let other = ca("someone else's root", BasicConstraints::Unconstrained, None);
        let mid = ca(
            "org issuing CA",
            BasicConstraints::Unconstrained,
            Some(&root),
        );
        // The file's root is not the one that signed the upstream CA: the bundle would
        // publish a root that anchors nothing ztid issues.
        let e = config_error(load(dir.path(), &mid, &[&mid, &other], None));
        assert!(e.contains("does not chain"), "{e}");
        // Same with the bundle in its own file.
        let e = config_error(load(dir.path(), &mid, &[&mid], Some(&[&other])));
        assert!(e.contains("does not reach a root of the bundle"), "{e}");
    }

    #[test]
    fn upstream_ca_whose_path_length_forbids_an_intermediate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = ca("root", BasicConstraints::Unconstrained, None);
        // pathLen 0: it may sign leaves only, not ztid's intermediate CA.
        let mid = ca(
            "org issuing CA",
            BasicConstraints::Constrained(0),
            Some(&root),
        );
        let e = config_error(load(dir.path(), &mid, &[&mid, &root], None));
        assert!(e.contains("pathLenConstraint 0"), "{e}");
        // A root with pathLen 1 above it leaves no room either (mid + ztid's CA = 2).
        let root = ca("root", BasicConstraints::Constrained(1), None);
        let mid = ca(
            "org issuing CA",
            BasicConstraints::Unconstrained,
            Some(&root),
        );
        let e = config_error(load(dir.path(), &mid, &[&mid, &root], None));
        assert!(e.contains("pathLenConstraint 1"), "{e}");
    }

    #[test]
    fn an_upstream_key_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = ca("root", BasicConstraints::Unconstrained, None);
        load(dir.path(), &root, &[&root], None).unwrap();
        let key_file = dir.path().join("upstream.key");
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let km: Arc<dyn KeyManager> =
            Arc::new(SoftwareKeyManager::open(dir.path().join("keys")).unwrap());
        let e = config_error(Upstream::load(
            &UpstreamConfig {
                cert: dir.path().join("upstream.pem"),
                key_file: Some(key_file),
                key_id: None,
                bundle: None,
            },
            &km,
        ));
        assert!(e.contains("accessible to others (mode 644)"), "{e}");
    }

    #[test]
    fn intermediates_never_outlive_any_certificate_of_the_upstream_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut root = ca("root", BasicConstraints::Unconstrained, None);
        // A root that expires before the CA it signed.
        root.params.not_after = rcgen::date_time_ymd(2030, 1, 1);
        let cert = root.params.self_signed(&root.key).unwrap();
        root.der = cert.der().to_vec();
        root.pem = cert.pem();
        let mid = ca(
            "org issuing CA",
            BasicConstraints::Unconstrained,
            Some(&root),
        );
        let u = load(dir.path(), &mid, &[&mid, &root], None).unwrap();
        assert_eq!(
            u.not_after, 1_893_456_000,
            "the root's notAfter, 2030-01-01"
        );
    }
}
