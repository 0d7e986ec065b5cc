//! AMD certificates: the pinned ARKs with their ASKs and ASVKs, VCEK/VLEK parsing, the
//! RSA-PSS chain signatures and the AMD CRL.
//!
//! Certificates are parsed once, with x509-parser, which accepts the serial number 0 that
//! every AMD VEK carries; chain and CRL signatures (RSASSA-PSS, SHA-384, MGF1-SHA-384,
//! salt 48) are checked with ring over the signed bytes as received. (The `sev` crate's
//! own check parses each certificate a second time, re-encodes the signed part, and runs
//! pure-Rust RSA: several times slower for the same answer.)

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, OnceLock};

use ring::signature::{UnparsedPublicKey, RSA_PSS_2048_8192_SHA384};
use x509_parser::prelude::*;

use crate::Error;
use ztid_attestation::RefusalKind::{Expired, Malformed, Revoked, UntrustedChain};

use super::report::Tcb;

/// (product, ARK PEM, ASK PEM, ASVK PEM).
type BuiltinRoots = (&'static str, &'static [u8], &'static [u8], &'static [u8]);

/// AMD's public root and signing keys (KDS `vcek/v1/<product>/cert_chain` and
/// `vlek/v1/<product>/cert_chain`).
const BUILTIN: &[BuiltinRoots] = &[
    (
        "Milan",
        include_bytes!("amd/milan_ark.pem"),
        include_bytes!("amd/milan_ask.pem"),
        include_bytes!("amd/milan_asvk.pem"),
    ),
    (
        "Genoa",
        include_bytes!("amd/genoa_ark.pem"),
        include_bytes!("amd/genoa_ask.pem"),
        include_bytes!("amd/genoa_asvk.pem"),
    ),
    (
        "Turin",
        include_bytes!("amd/turin_ark.pem"),
        include_bytes!("amd/turin_ask.pem"),
        include_bytes!("amd/turin_asvk.pem"),
    ),
];

const OID_PRODUCT_NAME: &str = "1.3.6.1.4.1.3704.1.2";
const OID_BL_SPL: &str = "1.3.6.1.4.1.3704.1.3.1";
const OID_TEE_SPL: &str = "1.3.6.1.4.1.3704.1.3.2";
const OID_SNP_SPL: &str = "1.3.6.1.4.1.3704.1.3.3";
const OID_UCODE_SPL: &str = "1.3.6.1.4.1.3704.1.3.8";
const OID_FMC_SPL: &str = "1.3.6.1.4.1.3704.1.3.9";
const OID_HWID: &str = "1.3.6.1.4.1.3704.1.4";
const OID_RSASSA_PSS: &str = "1.2.840.113549.1.1.10";

/// Verified (issuer, certificate or CRL) pairs, by the SHA-256 of both DER encodings;
/// see [`AmdCert::signed_by`].
static SIGNATURE_CACHE: OnceLock<Mutex<HashSet<[u8; 32]>>> = OnceLock::new();
/// Entries kept before the cache starts over (one per chip and TCB version seen).
const SIGNATURE_CACHE_MAX: usize = 4096;
/// Parsed certificates by the SHA-256 of their DER; see [`AmdCert::from_der`].
static PARSED_CACHE: OnceLock<Mutex<HashMap<[u8; 32], AmdCert>>> = OnceLock::new();
/// Entries kept before the cache starts over.
const PARSED_CACHE_MAX: usize = 1024;

/// A cache's map, used as it is after a panic elsewhere (no update is left half-done).
fn lock<T: Default>(cell: &'static OnceLock<Mutex<T>>) -> MutexGuard<'static, T> {
    cell.get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Whether `issuer` (by its digest) made the signature over `signed` (by its digest):
/// from the cache of verified pairs, else `check()`, remembered when it holds.
fn signature_cached(issuer: &[u8; 32], signed: &[u8; 32], check: impl FnOnce() -> bool) -> bool {
    let key = {
        let mut c = ring::digest::Context::new(&ring::digest::SHA256);
        c.update(issuer);
        c.update(signed);
        let mut k = [0u8; 32];
        k.copy_from_slice(c.finish().as_ref());
        k
    };
    if lock(&SIGNATURE_CACHE).contains(&key) {
        return true;
    }
    let ok = check();
    if ok {
        let mut c = lock(&SIGNATURE_CACHE);
        if c.len() >= SIGNATURE_CACHE_MAX {
            c.clear();
        }
        c.insert(key);
    }
    ok
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let mut o = [0u8; 32];
    o.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, b).as_ref());
    o
}

/// What an AMD certificate is, from its subject CN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Role {
    /// `ARK-<product>`: AMD Root Key (self-signed).
    Ark(String),
    /// `SEV-<product>`: AMD SEV Signing Key, issues VCEKs.
    Ask(String),
    /// `SEV-VLEK-<product>`: AMD SEV VLEK Signing Key, issues VLEKs.
    Asvk(String),
    /// `SEV-VCEK`: Versioned Chip Endorsement Key.
    Vcek,
    /// `SEV-VLEK`: Versioned Loaded Endorsement Key.
    Vlek,
    /// Anything else.
    Other,
}

impl Role {
    fn of(cn: &str) -> Self {
        if cn == "SEV-VCEK" {
            Role::Vcek
        } else if cn == "SEV-VLEK" {
            Role::Vlek
        } else if let Some(p) = cn.strip_prefix("ARK-") {
            Role::Ark(p.to_string())
        } else if let Some(p) = cn.strip_prefix("SEV-VLEK-") {
            Role::Asvk(p.to_string())
        } else if let Some(p) = cn.strip_prefix("SEV-") {
            Role::Ask(p.to_string())
        } else {
            Role::Other
        }
    }

    /// "VCEK" / "VLEK" / "ASK" ...
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Role::Ark(_) => "ARK",
            Role::Ask(_) => "ASK",
            Role::Asvk(_) => "ASVK",
            Role::Vcek => "VCEK",
            Role::Vlek => "VLEK",
            Role::Other => "certificate",
        }
    }
}

/// TCB security patch levels a VEK certifies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct VekTcb {
    pub bootloader: Option<u8>,
    pub tee: Option<u8>,
    pub snp: Option<u8>,
    pub microcode: Option<u8>,
    pub fmc: Option<u8>,
}

/// One parsed AMD certificate, owned.
#[derive(Clone)]
pub(crate) struct AmdCert {
    pub der: Vec<u8>,
    pub subject_cn: String,
    pub issuer_cn: String,
    pub subject_raw: Vec<u8>,
    pub issuer_raw: Vec<u8>,
    pub serial: Vec<u8>,
    pub not_before: i64,
    pub not_after: i64,
    /// The subjectPublicKey bits: SEC1 point (VEK) or RSAPublicKey (ARK/ASK/ASVK).
    pub public_key: Vec<u8>,
    pub role: Role,
    pub tcb: VekTcb,
    pub hwid: Option<Vec<u8>>,
    pub product_name: Option<String>,
    /// The signed part (TBSCertificate) as received, its signature and algorithm.
    tbs: Vec<u8>,
    signature: Vec<u8>,
    sig_oid: String,
    /// SHA-256 of `der`.
    digest: [u8; 32],
}

impl std::fmt::Debug for AmdCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AmdCert({})", self.subject_cn)
    }
}

impl AmdCert {
    /// Parses one DER certificate, or returns the certificate parsed earlier from the
    /// same bytes (a chip's VCEK and its ASK come back with every report).
    pub(crate) fn from_der(der: &[u8]) -> Result<Self, String> {
        let digest = sha256(der);
        if let Some(c) = lock(&PARSED_CACHE).get(&digest) {
            return Ok(c.clone());
        }
        let c = Self::parse(der, digest)?;
        let mut cache = lock(&PARSED_CACHE);
        if cache.len() >= PARSED_CACHE_MAX {
            cache.clear();
        }
        cache.insert(digest, c.clone());
        Ok(c)
    }

    fn parse(der: &[u8], digest: [u8; 32]) -> Result<Self, String> {
        let (rest, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        if !rest.is_empty() {
            return Err("trailing bytes after the certificate".into());
        }
        let cn = |n: &X509Name<'_>| {
            n.iter_common_name()
                .next()
                .and_then(|a| a.as_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let subject_cn = cn(cert.subject());
        let mut tcb = VekTcb::default();
        let mut hwid = None;
        let mut product_name = None;
        for ext in cert.extensions() {
            let oid = ext.oid.to_id_string();
            let spl = || der_small_uint(ext.value);
            match oid.as_str() {
                OID_BL_SPL => tcb.bootloader = Some(spl()?),
                OID_TEE_SPL => tcb.tee = Some(spl()?),
                OID_SNP_SPL => tcb.snp = Some(spl()?),
                OID_UCODE_SPL => tcb.microcode = Some(spl()?),
                OID_FMC_SPL => tcb.fmc = Some(spl()?),
                OID_HWID => hwid = Some(hwid_bytes(ext.value)),
                OID_PRODUCT_NAME => product_name = Some(der_string(ext.value)),
                _ => {}
            }
        }
        Ok(Self {
            der: der.to_vec(),
            role: Role::of(&subject_cn),
            issuer_cn: cn(cert.issuer()),
            subject_cn,
            subject_raw: cert.subject().as_raw().to_vec(),
            issuer_raw: cert.issuer().as_raw().to_vec(),
            serial: cert.raw_serial().to_vec(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            public_key: cert.public_key().subject_public_key.data.to_vec(),
            tcb,
            hwid,
            product_name,
            tbs: cert.tbs_certificate.as_ref().to_vec(),
            signature: cert.signature_value.data.to_vec(),
            sig_oid: cert.signature_algorithm.algorithm.to_id_string(),
            digest,
        })
    }

    /// True if `issuer`'s key made this certificate's RSASSA-PSS signature.
    ///
    /// Successful checks are remembered per exact (issuer, certificate) DER pair: a
    /// chip's VCEK comes back with every attestation of every VM on it (one VCEK per
    /// chip ID and reported TCB). The answer for identical bytes cannot change; dates,
    /// and everything the report says, are checked every time regardless.
    pub(crate) fn signed_by(&self, issuer: &AmdCert) -> bool {
        signature_cached(&issuer.digest, &self.digest, || {
            rsa_pss_sha384(
                &issuer.public_key,
                &self.sig_oid,
                &self.tbs,
                &self.signature,
            )
        })
    }

    /// Refuses unless `at` lies within the certificate's validity.
    pub(crate) fn check_time(&self, at: i64) -> Result<(), Error> {
        if at < self.not_before {
            return Err(Error::refused(
                Expired,
                format!(
                    "{} certificate {} is not yet valid at {} (valid from {})",
                    self.role.label(),
                    self.subject_cn,
                    rfc3339(at),
                    rfc3339(self.not_before)
                ),
            ));
        }
        if at > self.not_after {
            return Err(Error::refused(
                Expired,
                format!(
                    "{} certificate {} expired at {} (checked at {})",
                    self.role.label(),
                    self.subject_cn,
                    rfc3339(self.not_after),
                    rfc3339(at)
                ),
            ));
        }
        Ok(())
    }

    /// The TCB the VEK certifies, every component present.
    pub(crate) fn certified_tcb(&self, turin_layout: bool) -> Result<Tcb, Error> {
        let need = |v: Option<u8>, name: &str| {
            v.ok_or_else(|| {
                Error::refused(
                    Malformed,
                    format!(
                        "{} certificate lacks the {name} TCB extension",
                        self.role.label()
                    ),
                )
            })
        };
        Ok(Tcb {
            bootloader: need(self.tcb.bootloader, "blSPL")?,
            tee: need(self.tcb.tee, "teeSPL")?,
            snp: need(self.tcb.snp, "snpSPL")?,
            microcode: need(self.tcb.microcode, "ucodeSPL")?,
            fmc: if turin_layout {
                Some(need(self.tcb.fmc, "fmcSPL")?)
            } else {
                None
            },
        })
    }
}

/// An AMD signature: RSASSA-PSS with SHA-384, MGF1-SHA-384 and a 48-byte salt (ring's
/// `RSA_PSS_2048_8192_SHA384` fixes all three) by `rsa_public_key` (an RSAPublicKey).
fn rsa_pss_sha384(rsa_public_key: &[u8], sig_oid: &str, signed: &[u8], signature: &[u8]) -> bool {
    sig_oid == OID_RSASSA_PSS
        && UnparsedPublicKey::new(&RSA_PSS_2048_8192_SHA384, rsa_public_key)
            .verify(signed, signature)
            .is_ok()
}

/// A DER INTEGER in 0..=255 (an SPL extension value).
fn der_small_uint(v: &[u8]) -> Result<u8, String> {
    match v {
        [0x02, 1, b] if *b < 0x80 => Ok(*b),
        [0x02, 2, 0, b] if *b >= 0x80 => Ok(*b),
        _ => Err(format!("bad SPL extension value {}", hex::encode(v))),
    }
}

/// hwID: raw 64 bytes (Milan, Genoa) or 8 bytes (Turin), sometimes DER-wrapped.
fn hwid_bytes(v: &[u8]) -> Vec<u8> {
    if v.len() == 64 || v.len() == 8 {
        return v.to_vec();
    }
    match v {
        [0x04, n, rest @ ..] if *n as usize == rest.len() => rest.to_vec(),
        _ => v.to_vec(),
    }
}

fn der_string(v: &[u8]) -> String {
    match v {
        [0x16 | 0x0c | 0x13, n, rest @ ..] if *n as usize == rest.len() => {
            String::from_utf8_lossy(rest).into_owned()
        }
        _ => String::from_utf8_lossy(v).into_owned(),
    }
}

pub(crate) use crate::tsm::rfc3339;

/// An AMD CRL (issued by an ARK).
#[derive(Clone)]
pub(crate) struct AmdCrl {
    pub name: String,
    pub issuer_raw: Vec<u8>,
    pub issuer_cn: String,
    pub this_update: i64,
    pub next_update: Option<i64>,
    pub revoked: Vec<Vec<u8>>,
    tbs: Vec<u8>,
    signature: Vec<u8>,
    sig_oid: String,
    /// SHA-256 of the DER.
    digest: [u8; 32],
    /// From a source the CA itself keeps current (`collateral_dir`, the KDS cache or a
    /// KDS fetch), not from the node (its certificate table). Only such a CRL makes a
    /// fetch of AMD's current CRL unnecessary: a node could send an older genuine CRL,
    /// still within its nextUpdate, that predates a revocation. Off until the source
    /// says so (`trusted_by_ca`).
    pub ca_source: bool,
}

impl AmdCrl {
    pub(crate) fn from_der(name: &str, der: &[u8]) -> Result<Self, String> {
        let (_, crl) = CertificateRevocationList::from_der(der).map_err(|e| e.to_string())?;
        let issuer_cn = crl
            .issuer()
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .unwrap_or("")
            .to_string();
        Ok(Self {
            name: name.to_string(),
            issuer_raw: crl.issuer().as_raw().to_vec(),
            issuer_cn,
            this_update: crl.last_update().timestamp(),
            next_update: crl.next_update().map(|t| t.timestamp()),
            revoked: crl
                .iter_revoked_certificates()
                .map(|r| r.raw_serial().to_vec())
                .collect(),
            tbs: crl.tbs_cert_list.as_ref().to_vec(),
            signature: crl.signature_value.data.to_vec(),
            sig_oid: crl.signature_algorithm.algorithm.to_id_string(),
            digest: sha256(der),
            ca_source: false,
        })
    }

    /// This CRL, marked as from a source the CA keeps current itself.
    pub(crate) fn trusted_by_ca(mut self) -> Self {
        self.ca_source = true;
        self
    }

    /// Remembered per exact (ARK, CRL) pair as for certificates; the CRL's dates are
    /// checked at every use.
    fn signed_by(&self, ark: &AmdCert) -> bool {
        signature_cached(&ark.digest, &self.digest, || {
            rsa_pss_sha384(&ark.public_key, &self.sig_oid, &self.tbs, &self.signature)
        })
    }
}

/// Where a root came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// AMD's public roots, compiled in.
    Amd,
    /// `test_roots_dir` (test only).
    Test,
}

/// A pinned ARK.
#[derive(Clone)]
pub(crate) struct Anchor {
    pub ark: AmdCert,
    pub source: Source,
}

/// An ASK or ASVK known to be signed by an anchor.
#[derive(Clone)]
pub(crate) struct Intermediate {
    pub cert: AmdCert,
    pub anchor: usize,
}

/// The pinned ARKs and the signing keys verified under them.
#[derive(Clone)]
pub(crate) struct TrustStore {
    pub anchors: Vec<Anchor>,
    pub intermediates: Vec<Intermediate>,
}

/// The result of a VEK chain check.
pub(crate) struct ChainOk<'a> {
    pub anchor: &'a Anchor,
    pub intermediate: &'a AmdCert,
    /// The product (Milan, Genoa, Turin...) from the signing key's name.
    pub product: String,
}

static BUILTIN_STORE: OnceLock<Result<TrustStore, String>> = OnceLock::new();

impl TrustStore {
    /// AMD's roots for Milan, Genoa and Turin, parsed once per process. Their signatures
    /// (each ARK's own, each ASK's and ASVK's by its ARK) are checked where a chain goes
    /// through them ([`Self::check_vek_under`]), through the signature cache: a process
    /// pays once for the products it sees, and nothing for the others.
    pub(crate) fn builtin() -> Result<&'static TrustStore, Error> {
        BUILTIN_STORE
            .get_or_init(|| {
                let mut s = TrustStore {
                    anchors: Vec::new(),
                    intermediates: Vec::new(),
                };
                for (product, ark, ask, asvk) in BUILTIN {
                    let pem1 = |b: &[u8]| -> Result<AmdCert, String> {
                        let p = ::pem::parse(b).map_err(|e| e.to_string())?;
                        AmdCert::from_der(p.contents())
                    };
                    let ark = pem1(ark)?;
                    if ark.role != Role::Ark(product.to_string()) {
                        return Err(format!("built-in ARK for {product} is {}", ark.subject_cn));
                    }
                    let anchor = s.anchors.len();
                    for (cert, role) in [
                        (pem1(ask)?, Role::Ask(product.to_string())),
                        (pem1(asvk)?, Role::Asvk(product.to_string())),
                    ] {
                        if cert.role != role || cert.issuer_raw != ark.subject_raw {
                            return Err(format!(
                                "built-in {} {} is not issued by {}",
                                role.label(),
                                cert.subject_cn,
                                ark.subject_cn
                            ));
                        }
                        s.intermediates.push(Intermediate { cert, anchor });
                    }
                    s.anchors.push(Anchor {
                        ark,
                        source: Source::Amd,
                    });
                }
                Ok(s)
            })
            .as_ref()
            .map_err(|e| Error::Config(format!("built-in AMD roots: {e}")))
    }

    /// A copy of the built-in store plus the test roots in `dir` (ARK/ASK/ASVK PEM or DER
    /// files; every ARK must be self-signed and every signing key issued by one of them).
    pub(crate) fn with_test_roots(dir: &std::path::Path) -> Result<TrustStore, Error> {
        let mut s = Self::builtin()?.clone();
        let loaded = super::collateral::load_dir(dir)?;
        let (arks, others): (Vec<_>, Vec<_>) = loaded
            .certs
            .into_iter()
            .partition(|c| matches!(c.role, Role::Ark(_)));
        if arks.is_empty() {
            return Err(Error::Config(format!(
                "test_roots_dir {} holds no ARK (a self-signed certificate with CN ARK-<product>)",
                dir.display()
            )));
        }
        for a in arks {
            s.add_anchor(a, Source::Test).map_err(Error::Config)?;
        }
        for c in others {
            if matches!(c.role, Role::Ask(_) | Role::Asvk(_)) {
                s.add_intermediate(c).map_err(Error::Config)?;
            }
        }
        Ok(s)
    }

    fn add_anchor(&mut self, ark: AmdCert, source: Source) -> Result<(), String> {
        if !ark.signed_by(&ark) {
            return Err(format!("ARK {} is not self-signed", ark.subject_cn));
        }
        if !self.anchors.iter().any(|a| a.ark.der == ark.der) {
            self.anchors.push(Anchor { ark, source });
        }
        Ok(())
    }

    fn add_intermediate(&mut self, cert: AmdCert) -> Result<(), String> {
        match self.anchor_of(&cert) {
            Some(anchor) => {
                if !self.intermediates.iter().any(|i| i.cert.der == cert.der) {
                    self.intermediates.push(Intermediate { cert, anchor });
                }
                Ok(())
            }
            None => Err(format!(
                "{} is not signed by any pinned ARK",
                cert.subject_cn
            )),
        }
    }

    /// Checks that `key` (an ASK or ASVK) is signed by a pinned ARK, and that both are
    /// valid at `at`.
    pub(crate) fn check_signing_key(&self, key: &AmdCert, at: i64) -> Result<(), Error> {
        let anchor = self
            .anchor_of(key)
            .and_then(|a| self.anchors.get(a))
            .ok_or_else(|| {
                Error::refused(
                    UntrustedChain,
                    format!(
                        "signing key {} is not signed by any pinned AMD ARK",
                        key.subject_cn
                    ),
                )
            })?;
        anchor.ark.check_time(at)?;
        key.check_time(at)
    }

    /// The anchor whose ARK issued `cert`, by name and signature.
    fn anchor_of(&self, cert: &AmdCert) -> Option<usize> {
        self.anchors
            .iter()
            .position(|a| a.ark.subject_raw == cert.issuer_raw && cert.signed_by(&a.ark))
    }

    /// Checks `vek` (a VCEK or VLEK) up to a pinned ARK: the issuing key is looked up by
    /// name among the pinned signing keys and `extra` (ASKs/ASVKs from the evidence or
    /// the collateral, which must themselves be signed by a pinned ARK). Every
    /// certificate on the path must be valid at `at`.
    pub(crate) fn check_vek<'a>(
        &'a self,
        vek: &AmdCert,
        extra: &'a [AmdCert],
        at: i64,
    ) -> Result<ChainOk<'a>, Error> {
        let wanted = match vek.role {
            Role::Vcek => "ASK",
            Role::Vlek => "ASVK",
            _ => {
                return Err(Error::refused(
                    UntrustedChain,
                    format!("certificate {} is not a VCEK or VLEK", vek.subject_cn),
                ))
            }
        };
        let pinned = self
            .intermediates
            .iter()
            .filter(|i| i.cert.subject_raw == vek.issuer_raw)
            .map(|i| (&i.cert, Some(i.anchor)));
        let supplied = extra
            .iter()
            .filter(|c| {
                c.subject_raw == vek.issuer_raw
                    && !self.intermediates.iter().any(|i| i.cert.der == c.der)
            })
            .map(|c| (c, None));
        let candidates: Vec<(&AmdCert, Option<usize>)> = pinned.chain(supplied).collect();
        if candidates.is_empty() {
            return Err(Error::refused(UntrustedChain, format!(
                "no pinned AMD signing key named {:?} (the {} issuer); the {} does not chain to a pinned ARK",
                vek.issuer_cn,
                wanted,
                vek.role.label()
            )));
        }
        // Pinned signing keys come first; report the first failure (a pinned key's is
        // the most telling).
        let mut first = None;
        for (inter, anchor) in candidates {
            match self.check_vek_under(vek, inter, anchor, at) {
                Ok(ok) => return Ok(ok),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        Err(first.unwrap_or_else(|| {
            Error::refused(
                UntrustedChain,
                format!("no signing key to check the {} against", vek.role.label()),
            )
        }))
    }

    /// Checks `vek` under one given signing key, which must itself be signed by a pinned
    /// ARK (`anchor` when already known).
    pub(crate) fn check_vek_under<'a>(
        &'a self,
        vek: &AmdCert,
        inter: &'a AmdCert,
        anchor: Option<usize>,
        at: i64,
    ) -> Result<ChainOk<'a>, Error> {
        let anchor = match anchor
            .or_else(|| self.anchor_of(inter))
            .and_then(|a| self.anchors.get(a))
        {
            Some(a) => a,
            None => {
                return Err(Error::refused(
                    UntrustedChain,
                    format!(
                        "signing key {} is not signed by any pinned AMD ARK",
                        inter.subject_cn
                    ),
                ))
            }
        };
        // The pinned part of the path, on every use (answered by the signature cache after
        // the first): the ARK's own signature, and a pinned signing key's by the ARK (a
        // supplied one was just checked by `anchor_of`).
        if !anchor.ark.signed_by(&anchor.ark) {
            return Err(Error::refused(
                UntrustedChain,
                format!("pinned ARK {} is not self-signed", anchor.ark.subject_cn),
            ));
        }
        if !inter.signed_by(&anchor.ark) {
            return Err(Error::refused(
                UntrustedChain,
                format!(
                    "signing key {} is not signed by the pinned {}",
                    inter.subject_cn, anchor.ark.subject_cn
                ),
            ));
        }
        if !vek.signed_by(inter) {
            return Err(Error::refused(
                UntrustedChain,
                format!(
                    "{} signature does not verify under {} ({} pinned under {})",
                    vek.role.label(),
                    inter.subject_cn,
                    inter.role.label(),
                    anchor.ark.subject_cn
                ),
            ));
        }
        let product = match (&vek.role, &inter.role) {
            (Role::Vcek, Role::Ask(p)) | (Role::Vlek, Role::Asvk(p)) => p.clone(),
            (vr, ir) => {
                return Err(Error::refused(
                    UntrustedChain,
                    format!(
                        "a {} must be issued by an {}, not by {} ({})",
                        vr.label(),
                        if *vr == Role::Vlek { "ASVK" } else { "ASK" },
                        inter.subject_cn,
                        ir.label()
                    ),
                ))
            }
        };
        anchor.ark.check_time(at)?;
        inter.check_time(at)?;
        vek.check_time(at)?;
        Ok(ChainOk {
            anchor,
            intermediate: inter,
            product,
        })
    }

    /// The pinned ARK that issued and signed `crl`, refusing unless the CRL is current at
    /// `at`.
    pub(crate) fn check_crl(&self, crl: &AmdCrl, at: i64) -> Result<&Anchor, Error> {
        let Some(anchor) = self
            .anchors
            .iter()
            .find(|a| a.ark.subject_raw == crl.issuer_raw)
        else {
            return Err(Error::refused(
                UntrustedChain,
                format!(
                    "CRL {} is issued by {:?}, not by a pinned AMD ARK",
                    crl.name, crl.issuer_cn
                ),
            ));
        };
        if !crl.signed_by(&anchor.ark) {
            return Err(Error::refused(
                UntrustedChain,
                format!(
                    "CRL {} signature does not verify under {}",
                    crl.name, anchor.ark.subject_cn
                ),
            ));
        }
        if at < crl.this_update {
            return Err(Error::refused(
                Expired,
                format!(
                    "CRL {} is not yet valid at {} (issued {})",
                    crl.name,
                    rfc3339(at),
                    rfc3339(crl.this_update)
                ),
            ));
        }
        if let Some(next) = crl.next_update {
            if at > next {
                return Err(Error::refused(
                    Expired,
                    format!(
                        "CRL {} expired at {} (checked at {})",
                        crl.name,
                        rfc3339(next),
                        rfc3339(at)
                    ),
                ));
            }
        }
        Ok(anchor)
    }

    /// Applies every CRL: each must be issued and signed by a pinned ARK and current at
    /// `at`; the CRLs of the chain's ARK must not list its signing key. Returns whether a
    /// CRL for the chain's ARK was checked.
    pub(crate) fn check_crls(
        &self,
        crls: &[AmdCrl],
        chain: &ChainOk<'_>,
        at: i64,
    ) -> Result<bool, Error> {
        let mut checked = false;
        for crl in crls {
            let anchor = self.check_crl(crl, at)?;
            if !std::ptr::eq(anchor, chain.anchor) {
                continue;
            }
            checked = true;
            if crl.revoked.contains(&chain.intermediate.serial) {
                return Err(Error::refused(
                    Revoked,
                    format!(
                        "{} {} (serial {}) is revoked by CRL {}",
                        chain.intermediate.role.label(),
                        chain.intermediate.subject_cn,
                        hex::encode(&chain.intermediate.serial),
                        crl.name
                    ),
                ));
            }
        }
        Ok(checked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_roots_verify_and_match_the_sev_crate() {
        let s = TrustStore::builtin().unwrap();
        assert_eq!(s.anchors.len(), 3);
        assert_eq!(s.intermediates.len(), 6);
        use sev::certs::snp::builtin::{genoa, milan, turin};
        let sev_roots = [
            (milan::ark().unwrap(), milan::ask().unwrap()),
            (genoa::ark().unwrap(), genoa::ask().unwrap()),
            (turin::ark().unwrap(), turin::ask().unwrap()),
        ];
        for a in &s.anchors {
            assert!(a.ark.signed_by(&a.ark), "{}", a.ark.subject_cn);
        }
        for i in &s.intermediates {
            assert!(
                i.cert.signed_by(&s.anchors[i.anchor].ark),
                "{}",
                i.cert.subject_cn
            );
        }
        for (i, (ark, ask)) in sev_roots.iter().enumerate() {
            assert_eq!(s.anchors[i].ark.der, ark.to_der().unwrap());
            assert_eq!(s.intermediates[2 * i].cert.der, ask.to_der().unwrap());
            assert!(matches!(
                s.intermediates[2 * i + 1].cert.role,
                Role::Asvk(_)
            ));
            assert_eq!(s.intermediates[2 * i + 1].anchor, i);
        }
    }

    #[test]
    fn roles_from_names() {
        assert_eq!(Role::of("ARK-Milan"), Role::Ark("Milan".into()));
        assert_eq!(Role::of("SEV-Milan"), Role::Ask("Milan".into()));
        assert_eq!(Role::of("SEV-VLEK-Genoa"), Role::Asvk("Genoa".into()));
        assert_eq!(Role::of("SEV-VCEK"), Role::Vcek);
        assert_eq!(Role::of("SEV-VLEK"), Role::Vlek);
        assert_eq!(Role::of("Intel"), Role::Other);
    }

    #[test]
    fn spl_values() {
        assert_eq!(der_small_uint(&[2, 1, 115]).unwrap(), 115);
        assert_eq!(der_small_uint(&[2, 2, 0, 217]).unwrap(), 217);
        assert!(der_small_uint(&[2, 1, 0x80]).is_err());
        assert!(der_small_uint(&[4, 1, 1]).is_err());
    }
}
