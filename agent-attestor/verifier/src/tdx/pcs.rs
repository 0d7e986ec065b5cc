//! Optional Intel PCS fetching (`pcs_fetch = true`): the collateral for a quote's FMSPC,
//! assembled into dcap-qvl's `QuoteCollateralV3` and cached as
//! `{pcs_cache_dir}/collateral-<fmspc>-<processor|platform>.json` (per PCK CA, since the
//! PCK CRL inside is that CA's).
//!
//! Requests (PCS API v4; a PCCS serves the same paths):
//!
//! - `{pcs_url}/sgx/certification/v4/pckcrl?ca={processor|platform}&encoding=der`: the
//!   PCK CRL of the quote's PCK CA, issuer chain in `SGX-PCK-CRL-Issuer-Chain`;
//! - `{pcs_url}/tdx/certification/v4/tcb?fmspc={FMSPC}`: `{"tcbInfo":…,"signature":…}`,
//!   issuer chain in `TCB-Info-Issuer-Chain` (or `SGX-TCB-Info-Issuer-Chain`);
//! - `{pcs_url}/tdx/certification/v4/qe/identity`: `{"enclaveIdentity":…,"signature":…}`,
//!   issuer chain in `SGX-Enclave-Identity-Issuer-Chain` (or `Enclave-Identity-Issuer-Chain`);
//! - `{pcs_root_ca_crl_url}`: the Intel SGX Root CA CRL (PCS itself does not serve it;
//!   the default is the root certificate's CRL distribution point).
//!
//! Issuer chains arrive URL-encoded; CRLs are accepted as DER, PEM or hex (a PCCS answers
//! in hex). The signed TCB info and QE identity are kept byte for byte as received.
//! dcap-qvl's own collateral client was not reused: it is async and needs reqwest (its
//! `report` feature).
//!
//! Nothing fetched is trusted for itself: the quote is verified with it exactly as with
//! offline collateral (dcap-qvl checks every signature and issuer chain up to the pinned
//! Intel SGX Root CA, and the dates), and it is cached only after that verification
//! passed. A cached file is used without a request while every dated item in it is
//! current at the verification time (until the earliest nextUpdate), and fetched again
//! after.

use std::path::PathBuf;

use dcap_qvl::QuoteCollateralV3;

use crate::fetch::{self, Cache};
use crate::Error;
use ztid_attestation::RefusalKind::{self, CollateralUnavailable};

/// Intel's Provisioning Certification Service.
pub(crate) const DEFAULT_PCS_URL: &str = "https://api.trustedservices.intel.com";
/// Where Intel publishes the SGX Root CA's CRL (the root certificate's CRL distribution point).
pub(crate) const DEFAULT_ROOT_CA_CRL_URL: &str =
    "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der";

/// `[attestors.tdx]` fetching settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PcsConfig {
    pub base_url: String,
    pub root_ca_crl_url: String,
    pub cache_dir: PathBuf,
}

/// The PCS client with its cache.
pub(crate) struct Pcs {
    pub(crate) base: String,
    root_ca_crl_url: String,
    cache: Cache,
    client: fetch::Client,
}

fn refuse(kind: RefusalKind, m: impl Into<String>) -> Error {
    Error::refused(kind, m)
}

pub(crate) fn tcb_url(base: &str, fmspc: &[u8]) -> String {
    format!(
        "{base}/tdx/certification/v4/tcb?fmspc={}",
        hex::encode_upper(fmspc)
    )
}

pub(crate) fn qe_identity_url(base: &str) -> String {
    format!("{base}/tdx/certification/v4/qe/identity")
}

pub(crate) fn pck_crl_url(base: &str, ca: &str) -> String {
    format!("{base}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der")
}

/// The collateral directory's file name for an FMSPC.
pub(crate) fn file_name(fmspc: &[u8]) -> String {
    format!("collateral-{}.json", hex::encode(fmspc))
}

/// The cache's file name for an FMSPC and the PCK CA (`processor` or `platform`) whose
/// CRL the collateral carries: one platform model may have PCKs from either CA.
pub(crate) fn cache_file_name(fmspc: &[u8], ca: &str) -> String {
    format!("collateral-{}-{ca}.json", hex::encode(fmspc))
}

/// A CRL body: DER, PEM or hex text.
fn crl_der(body: &[u8]) -> Result<Vec<u8>, String> {
    if body.first() == Some(&0x30) {
        return Ok(body.to_vec());
    }
    let text = std::str::from_utf8(body).map_err(|_| "not a DER, PEM or hex CRL".to_string())?;
    if text.contains("-----BEGIN") {
        return pem::parse(text)
            .map(|p| p.into_contents())
            .map_err(|e| format!("bad PEM CRL: {e}"));
    }
    hex::decode(text.trim()).map_err(|_| "not a DER, PEM or hex CRL".to_string())
}

/// The URL-decoded PEM issuer chain in the first of `names` the response carries.
fn issuer_chain(resp: &fetch::Response, url: &str, names: &[&str]) -> Result<String, String> {
    // The name errors use; every caller passes at least one.
    let name = names.first().copied().unwrap_or_default();
    let raw = names
        .iter()
        .find_map(|n| resp.header(n))
        .ok_or_else(|| format!("the response from {url} lacks the {name} header"))?;
    let chain = fetch::percent_decode(raw).map_err(|e| format!("{name} from {url}: {e}"))?;
    if !chain.contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!("{name} from {url} holds no PEM certificate"));
    }
    Ok(chain)
}

/// The signed JSON object under `key` (exact bytes) and its signature.
fn signed_json(body: &[u8], key: &str, url: &str) -> Result<(String, Vec<u8>), String> {
    let v: std::collections::HashMap<String, &serde_json::value::RawValue> =
        serde_json::from_slice(body)
            .map_err(|e| format!("the response from {url} is not JSON: {e}"))?;
    let obj = v
        .get(key)
        .ok_or_else(|| format!("the response from {url} has no {key:?}"))?;
    let sig = v
        .get("signature")
        .and_then(|s| serde_json::from_str::<String>(s.get()).ok())
        .ok_or_else(|| format!("the response from {url} has no \"signature\" string"))?;
    let sig = hex::decode(sig).map_err(|_| format!("the signature from {url} is not hex"))?;
    Ok((obj.get().to_string(), sig))
}

impl Pcs {
    pub(crate) fn new(cfg: &PcsConfig) -> Self {
        Self {
            base: cfg.base_url.clone(),
            root_ca_crl_url: cfg.root_ca_crl_url.clone(),
            cache: Cache::new(cfg.cache_dir.clone()),
            client: fetch::Client::default(),
        }
    }

    /// Creates the cache directory (0700).
    pub(crate) fn create_cache(&self) -> Result<(), Error> {
        self.cache.create()
    }

    /// The cached collateral for `fmspc`, if every dated item in it is current at `at`.
    pub(crate) fn cached(&self, fmspc: &[u8], ca: &str, at: i64) -> Option<QuoteCollateralV3> {
        let name = cache_file_name(fmspc, ca);
        let bytes = self.cache.read(&name)?;
        let c: QuoteCollateralV3 = serde_json::from_slice(&bytes).ok()?;
        match super::check_collateral_dates(&c, at) {
            Ok(()) => Some(c),
            Err(e) => {
                tracing::info!(
                    file = %self.cache.path(&name).display(),
                    reason = %e,
                    "tdx: cached collateral not current at the verification time; fetching it again"
                );
                None
            }
        }
    }

    /// Keeps collateral that verified a quote.
    pub(crate) fn store(&self, fmspc: &[u8], ca: &str, c: &QuoteCollateralV3) {
        let r = serde_json::to_vec_pretty(c)
            .map_err(|e| Error::Config(e.to_string()))
            .and_then(|b| self.cache.write(&cache_file_name(fmspc, ca), &b));
        if let Err(e) = r {
            tracing::warn!(error = %e, "tdx: could not cache collateral fetched from Intel PCS");
        }
    }

    /// Fetches the collateral for `fmspc` whose PCK certificate `ca` (`processor` or
    /// `platform`) issued.
    pub(crate) fn fetch(&self, fmspc: &[u8], ca: &str) -> Result<QuoteCollateralV3, Error> {
        self.fetch_inner(fmspc, ca).map_err(|e| {
            refuse(
                CollateralUnavailable,
                format!(
                    "fetching TDX collateral for FMSPC {} from Intel PCS failed: {e}",
                    hex::encode(fmspc)
                ),
            )
        })
    }

    fn fetch_inner(&self, fmspc: &[u8], ca: &str) -> Result<QuoteCollateralV3, String> {
        let url = pck_crl_url(&self.base, ca);
        let r = self.client.get(&url)?;
        let pck_crl_issuer_chain = issuer_chain(&r, &url, &["SGX-PCK-CRL-Issuer-Chain"])?;
        let pck_crl = crl_der(&r.body).map_err(|e| format!("the PCK CRL from {url}: {e}"))?;

        let url = tcb_url(&self.base, fmspc);
        let r = self.client.get(&url)?;
        let tcb_info_issuer_chain = issuer_chain(
            &r,
            &url,
            &["TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"],
        )?;
        let (tcb_info, tcb_info_signature) = signed_json(&r.body, "tcbInfo", &url)?;

        let url = qe_identity_url(&self.base);
        let r = self.client.get(&url)?;
        let qe_identity_issuer_chain = issuer_chain(
            &r,
            &url,
            &[
                "SGX-Enclave-Identity-Issuer-Chain",
                "Enclave-Identity-Issuer-Chain",
            ],
        )?;
        let (qe_identity, qe_identity_signature) = signed_json(&r.body, "enclaveIdentity", &url)?;

        let url = &self.root_ca_crl_url;
        let r = self.client.get(url)?;
        let root_ca_crl =
            crl_der(&r.body).map_err(|e| format!("the root CA CRL from {url}: {e}"))?;

        Ok(QuoteCollateralV3 {
            pck_crl_issuer_chain,
            root_ca_crl,
            pck_crl,
            tcb_info_issuer_chain,
            tcb_info,
            tcb_info_signature,
            qe_identity_issuer_chain,
            qe_identity,
            qe_identity_signature,
            pck_certificate_chain: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcs_urls() {
        let base = DEFAULT_PCS_URL;
        let fmspc = [0xb0, 0xc0, 0x6f, 0, 0, 0];
        assert_eq!(
            tcb_url(base, &fmspc),
            "https://api.trustedservices.intel.com/tdx/certification/v4/tcb?fmspc=B0C06F000000"
        );
        assert_eq!(
            qe_identity_url(base),
            "https://api.trustedservices.intel.com/tdx/certification/v4/qe/identity"
        );
        assert_eq!(
            pck_crl_url(base, "platform"),
            "https://api.trustedservices.intel.com/sgx/certification/v4/pckcrl?ca=platform&encoding=der"
        );
        assert_eq!(file_name(&fmspc), "collateral-b0c06f000000.json");
        assert_eq!(
            cache_file_name(&fmspc, "platform"),
            "collateral-b0c06f000000-platform.json"
        );
    }

    #[test]
    fn signed_json_keeps_the_exact_bytes() {
        let body = br#"{"tcbInfo":{"b":1, "a":[2,3]},"signature":"0aff"}"#;
        let (obj, sig) = signed_json(body, "tcbInfo", "u").unwrap();
        assert_eq!(obj, r#"{"b":1, "a":[2,3]}"#);
        assert_eq!(sig, vec![0x0a, 0xff]);
        assert!(signed_json(b"{}", "tcbInfo", "u")
            .unwrap_err()
            .contains("no \"tcbInfo\""));
        assert!(signed_json(b"x", "tcbInfo", "u")
            .unwrap_err()
            .contains("not JSON"));
    }

    #[test]
    fn crl_encodings() {
        assert_eq!(crl_der(&[0x30, 1, 2]).unwrap(), vec![0x30, 1, 2]);
        assert!(crl_der(b"30 01 02".as_ref()).is_err());
        assert_eq!(crl_der(b"300102\n").unwrap(), vec![0x30, 1, 2]);
        let p = pem::encode(&pem::Pem::new("X509 CRL", vec![0x30, 0]));
        assert_eq!(crl_der(p.as_bytes()).unwrap(), vec![0x30, 0]);
    }
}
