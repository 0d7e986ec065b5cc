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
//! # Request bounds
//!
//! The quote is unauthenticated when its collateral is fetched, so:
//!
//! - nothing is fetched for a quote whose PCK certificate chain does not verify up to the
//!   pinned Intel SGX Root CA (see `chain.rs`): a made-up FMSPC costs no request;
//! - the PCK CRL (per CA), QE identity and root CA CRL URLs are fixed: they are charged
//!   to the fixed-URL budget ([`fetch::Pool::FixedUrl`]) and kept in memory, checked
//!   (issuer chain to the pinned root, signature, dates), while current at the
//!   verification time; an item that did not check out is kept for [`RECENT_FETCH`]
//!   anyway (dcap-qvl refuses it with the quote), so no flood can make them fetched more
//!   than once a minute each;
//! - the TCB info URL (per FMSPC) is charged to the known-platform budget
//!   ([`fetch::Pool::KnownPlatform`]) for a platform (FMSPC, PCK CA) whose quote passed a
//!   full verification, at most [`KNOWN_PLATFORM_FETCHES_PER_HOUR`] times an hour each (at
//!   most [`MAX_KNOWN_PLATFORMS`] remembered, least recently verified forgotten first),
//!   and to the open budget otherwise; a TCB info fetched is reused for [`RECENT_FETCH`]
//!   (at most [`MAX_RECENT_TCB`] kept), whatever became of the quote;
//! - collateral whose every item checks out (issuer chains, signatures, dates, the TCB
//!   info's FMSPC) is cached at once, before the quote is verified with it, so replaying
//!   a genuine PCK certificate with a garbage quote fetches that platform's collateral
//!   once per validity period (about a month), not once per attempt.
//!
//! Outbound requests stay bounded by the open, known-platform and fixed-URL budgets
//! together (90 a minute, 8 at once), memory by the bounds above.
//!
//! What is left: genuine PCK certificates are not secret (every quote carries one) and a
//! revoked one passes the chain check (the PCK CRL is among what is fetched; dcap-qvl
//! checks revocation with the quote), so a sender can still make the CA fetch for each
//! genuine platform model (FMSPC and PCK CA) it holds a certificate of, a set bounded by
//! Intel's platform models, not by the sender. Those whose collateral PCS serves cost one fetch per validity period (and one
//! cache file each). Those it does not serve (an SGX-only model has no TDX TCB info, and
//! a PCCS answers 404 until it has synced an FMSPC) cost one open-budget request a
//! minute each, so someone holding certificates of 30 or more such models can keep the
//! open budget spent and delay the first fetch for a platform model never verified
//! before; known platforms, cached collateral and the fixed URLs are unaffected. Ship
//! such a model's collateral in `collateral_dir` to need no fetch. A restart forgets the
//! in-memory items and known platforms, not the cache.
//!
//! Nothing fetched is trusted for itself: the quote is verified with it exactly as with
//! offline collateral (dcap-qvl checks every signature and issuer chain up to the pinned
//! Intel SGX Root CA, the CRLs and the dates). Collateral that did not pass the checks
//! above is cached only once a quote verified with it. A cached file is used without a
//! request while every dated item in it is current at the verification time (until the
//! earliest nextUpdate), and fetched again after.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dcap_qvl::QuoteCollateralV3;

use super::chain;
use crate::fetch::{self, Cache, Pool};
use crate::Error;
use ztid_attestation::RefusalKind::{self, CollateralUnavailable};

/// How long a fetched item that did not check out (or any fetched TCB info) is used
/// again without a request.
pub(crate) const RECENT_FETCH: Duration = fetch::FAILURE_MEMORY;
/// Most TCB infos kept for [`RECENT_FETCH`] (each a few KiB).
pub(crate) const MAX_RECENT_TCB: usize = 256;
/// Most known platforms (FMSPC and PCK CA of a fully verified quote) remembered.
pub(crate) const MAX_KNOWN_PLATFORMS: usize = 1024;
/// Most TCB info requests of one known platform charged to the known-platform budget
/// per hour: a genuine platform needs one a month (when its TCB info expires).
pub(crate) const KNOWN_PLATFORM_FETCHES_PER_HOUR: usize = 4;

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
    pub(crate) client: fetch::Client,
    memory: Mutex<Memory>,
}

/// A fetched item kept in memory.
#[derive(Clone)]
struct Kept<T> {
    item: T,
    fetched: Instant,
    /// Checked (issuer chain, signature) and current at the verification time of the
    /// fetch; the dates: issued, next update.
    checked: Option<(i64, i64)>,
}

impl<T: Clone> Kept<T> {
    /// The item, if it checked out and is current at `at`, or was fetched less than
    /// [`RECENT_FETCH`] ago.
    fn usable(&self, at: i64, now: Instant) -> Option<T> {
        let current = self
            .checked
            .is_some_and(|(from, until)| from <= at && at <= until);
        (current || now.duration_since(self.fetched) < RECENT_FETCH).then(|| self.item.clone())
    }
}

/// A PCK CRL with its issuer chain.
#[derive(Clone)]
struct PckCrl {
    chain: String,
    crl: Vec<u8>,
}

/// A signed TCB info or QE identity with its issuer chain.
#[derive(Clone)]
struct Signed {
    chain: String,
    json: String,
    sig: Vec<u8>,
}

/// What the client keeps in memory: the fixed-URL items (at most two PCK CRLs, one QE
/// identity, one root CA CRL), recent TCB infos and known platforms, all bounded.
struct Memory {
    pck_crl: HashMap<&'static str, Kept<PckCrl>>,
    qe_identity: Option<Kept<Signed>>,
    root_ca_crl: Option<Kept<Vec<u8>>>,
    tcb: HashMap<chain::Platform, Kept<Signed>>,
    known: KnownPlatforms,
}

impl Default for Memory {
    fn default() -> Self {
        Self {
            pck_crl: HashMap::new(),
            qe_identity: None,
            root_ca_crl: None,
            tcb: HashMap::new(),
            known: known_platforms(),
        }
    }
}

/// Platforms (FMSPC and PCK CA) whose quotes passed a full verification.
type KnownPlatforms = fetch::KnownSources<chain::Platform>;

fn known_platforms() -> KnownPlatforms {
    fetch::KnownSources::new(
        Pool::KnownPlatform,
        MAX_KNOWN_PLATFORMS,
        KNOWN_PLATFORM_FETCHES_PER_HOUR,
    )
}

/// The dates of a CRL (issued, next update; far future without one).
fn crl_dates(der: &[u8]) -> Option<(i64, i64)> {
    use x509_parser::prelude::FromDer;
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der).ok()?;
    Some((
        crl.last_update().timestamp(),
        crl.next_update().map_or(i64::MAX, |t| t.timestamp()),
    ))
}

/// The issue and next-update dates of a signed TCB info or QE identity.
fn json_dates(json: &str) -> Option<(i64, i64)> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let t = |k: &str| {
        time::OffsetDateTime::parse(
            v.get(k)?.as_str()?,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()
        .map(|t| t.unix_timestamp())
    };
    Some((t("issueDate")?, t("nextUpdate")?))
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
            memory: Mutex::new(Memory::default()),
        }
    }

    fn memory(&self) -> MutexGuard<'_, Memory> {
        // A panic elsewhere cannot leave the memory inconsistent: use it as it is.
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that a quote of platform `p` passed a full verification, so its TCB info
    /// fetches are charged to the known-platform budget.
    pub(crate) fn remember_verified(&self, p: chain::Platform) {
        self.memory().known.remember(&p, Instant::now());
    }

    /// True if the platform is remembered as known (tests).
    #[cfg(test)]
    pub(crate) fn is_known(&self, p: &chain::Platform) -> bool {
        self.memory().known.contains(p)
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

    /// Keeps collateral that checked out on its own (see [`chain::check_collateral`]) or
    /// verified a quote.
    pub(crate) fn store(&self, fmspc: &[u8], ca: &str, c: &QuoteCollateralV3) {
        let r = serde_json::to_vec_pretty(c)
            .map_err(|e| Error::Config(e.to_string()))
            .and_then(|b| self.cache.write(&cache_file_name(fmspc, ca), &b));
        if let Err(e) = r {
            tracing::warn!(error = %e, "tdx: could not cache collateral fetched from Intel PCS");
        }
    }

    /// The collateral for platform `p` (whose PCK certificate chain verified) at `at`:
    /// kept items, else fetched. Returned with whether it was cached on disk, which it is
    /// at once when every item checks out (see the module documentation).
    pub(crate) fn fetch(
        &self,
        p: chain::Platform,
        at: i64,
    ) -> Result<(QuoteCollateralV3, bool), Error> {
        let c = self.fetch_inner(p, at).map_err(|e| {
            refuse(
                CollateralUnavailable,
                format!(
                    "fetching TDX collateral for FMSPC {} from Intel PCS failed: {e}",
                    hex::encode(p.0)
                ),
            )
        })?;
        let stored = match chain::check_collateral(&c, &p.0, at) {
            Ok(()) => {
                self.store(&p.0, p.1, &c);
                true
            }
            Err(e) => {
                tracing::info!(
                    fmspc = %hex::encode(p.0),
                    reason = %e,
                    "tdx: collateral fetched from Intel PCS does not check out; cached only if a quote verifies with it"
                );
                false
            }
        };
        Ok((c, stored))
    }

    fn fetch_inner(&self, p: chain::Platform, at: i64) -> Result<QuoteCollateralV3, String> {
        let (fmspc, ca) = p;
        let PckCrl {
            chain: pck_crl_issuer_chain,
            crl: pck_crl,
        } = self.pck_crl(ca, at)?;
        let Signed {
            chain: tcb_info_issuer_chain,
            json: tcb_info,
            sig: tcb_info_signature,
        } = self.tcb_info(p, &fmspc, at)?;
        let Signed {
            chain: qe_identity_issuer_chain,
            json: qe_identity,
            sig: qe_identity_signature,
        } = self.qe_identity(at)?;
        let root_ca_crl = self.root_ca_crl(at)?;
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

    /// The PCK CRL of `ca`: kept, else fetched (fixed-URL budget).
    fn pck_crl(&self, ca: &'static str, at: i64) -> Result<PckCrl, String> {
        let now = Instant::now();
        if let Some(k) = self
            .memory()
            .pck_crl
            .get(ca)
            .and_then(|k| k.usable(at, now))
        {
            return Ok(k);
        }
        let url = pck_crl_url(&self.base, ca);
        let r = self
            .client
            .get_pcs(&url, Pool::FixedUrl)
            .map_err(|e| e.to_string())?;
        let chain = issuer_chain(&r, &url, &["SGX-PCK-CRL-Issuer-Chain"])?;
        let crl = crl_der(&r.body).map_err(|e| format!("the PCK CRL from {url}: {e}"))?;
        let checked = chain::check_pck_crl(&chain, &crl, at)
            .ok()
            .and_then(|()| crl_dates(&crl));
        let item = PckCrl { chain, crl };
        self.memory().pck_crl.insert(
            ca,
            Kept {
                item: item.clone(),
                fetched: now,
                checked,
            },
        );
        Ok(item)
    }

    /// The TCB info of platform `p`: fetched less than [`RECENT_FETCH`] ago, else fetched
    /// (known-platform budget for a known platform within its quota, else open).
    fn tcb_info(&self, p: chain::Platform, fmspc: &[u8], at: i64) -> Result<Signed, String> {
        let now = Instant::now();
        let pool = {
            let mut m = self.memory();
            m.tcb
                .retain(|_, k| now.duration_since(k.fetched) < RECENT_FETCH);
            if let Some(k) = m.tcb.get(&p).and_then(|k| k.usable(at, now)) {
                return Ok(k);
            }
            m.known.pool_for(&p, now)
        };
        let url = tcb_url(&self.base, fmspc);
        let got = self.client.get_pcs(&url, pool);
        if pool == Pool::KnownPlatform && !matches!(got, Err(fetch::FetchError::NotMade { .. })) {
            self.memory().known.count_fetch(&p, Instant::now());
        }
        let r = got.map_err(|e| e.to_string())?;
        let chain = issuer_chain(
            &r,
            &url,
            &["TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"],
        )?;
        let (json, sig) = signed_json(&r.body, "tcbInfo", &url)?;
        let item = Signed { chain, json, sig };
        let mut m = self.memory();
        fetch::make_room(&mut m.tcb, MAX_RECENT_TCB, |k| k.fetched);
        m.tcb.insert(
            p,
            Kept {
                item: item.clone(),
                fetched: now,
                checked: None,
            },
        );
        Ok(item)
    }

    /// The QE identity: kept, else fetched (fixed-URL budget).
    fn qe_identity(&self, at: i64) -> Result<Signed, String> {
        let now = Instant::now();
        if let Some(k) = self
            .memory()
            .qe_identity
            .as_ref()
            .and_then(|k| k.usable(at, now))
        {
            return Ok(k);
        }
        let url = qe_identity_url(&self.base);
        let r = self
            .client
            .get_pcs(&url, Pool::FixedUrl)
            .map_err(|e| e.to_string())?;
        let chain = issuer_chain(
            &r,
            &url,
            &[
                "SGX-Enclave-Identity-Issuer-Chain",
                "Enclave-Identity-Issuer-Chain",
            ],
        )?;
        let (json, sig) = signed_json(&r.body, "enclaveIdentity", &url)?;
        let checked = chain::check_signed(&chain, &json, &sig, "the QE identity", at)
            .ok()
            .and_then(|()| json_dates(&json));
        let item = Signed { chain, json, sig };
        self.memory().qe_identity = Some(Kept {
            item: item.clone(),
            fetched: now,
            checked,
        });
        Ok(item)
    }

    /// The root CA CRL: kept, else fetched (fixed-URL budget).
    fn root_ca_crl(&self, at: i64) -> Result<Vec<u8>, String> {
        let now = Instant::now();
        if let Some(k) = self
            .memory()
            .root_ca_crl
            .as_ref()
            .and_then(|k| k.usable(at, now))
        {
            return Ok(k);
        }
        let url = &self.root_ca_crl_url;
        let r = self
            .client
            .get_pcs(url, Pool::FixedUrl)
            .map_err(|e| e.to_string())?;
        let crl = crl_der(&r.body).map_err(|e| format!("the root CA CRL from {url}: {e}"))?;
        let checked = chain::check_root_crl(&crl, at)
            .ok()
            .and_then(|()| crl_dates(&crl));
        self.memory().root_ca_crl = Some(Kept {
            item: crl.clone(),
            fetched: now,
            checked,
        });
        Ok(crl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::HOUR;

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
        assert!(signed_json(&b"x"[..], "tcbInfo", "u")
            .unwrap_err()
            .contains("not JSON"));
    }

    #[test]
    fn known_platforms_have_a_bounded_quota_and_a_bounded_list() {
        let mut k = known_platforms();
        let t0 = Instant::now();
        let p = ([1, 2, 3, 4, 5, 6], "platform");
        assert_eq!(k.pool_for(&p, t0), Pool::Open);
        k.remember(&p, t0);
        // The other CA's PCKs of the same FMSPC are another platform.
        assert_eq!(
            k.pool_for(&([1, 2, 3, 4, 5, 6], "processor"), t0),
            Pool::Open
        );
        for _ in 0..KNOWN_PLATFORM_FETCHES_PER_HOUR {
            assert_eq!(k.pool_for(&p, t0), Pool::KnownPlatform);
            k.count_fetch(&p, t0);
        }
        assert_eq!(k.pool_for(&p, t0), Pool::Open);
        assert_eq!(k.pool_for(&p, t0 + HOUR), Pool::KnownPlatform);
        for i in 0..=MAX_KNOWN_PLATFORMS as u32 {
            let b = i.to_be_bytes();
            k.remember(
                &([b[0], b[1], b[2], b[3], 0, 1], "processor"),
                t0 + Duration::from_millis(u64::from(i) + 1),
            );
        }
        assert_eq!(k.len(), MAX_KNOWN_PLATFORMS);
        assert!(!k.contains(&p), "the least recently verified goes");
    }

    #[test]
    fn kept_items_are_used_while_checked_and_current_or_recent() {
        let t0 = Instant::now();
        let k = Kept {
            item: 7,
            fetched: t0,
            checked: Some((100, 200)),
        };
        assert_eq!(k.usable(150, t0 + HOUR), Some(7));
        assert_eq!(k.usable(250, t0 + HOUR), None);
        assert_eq!(k.usable(250, t0), Some(7));
        let unchecked = Kept { checked: None, ..k };
        assert_eq!(unchecked.usable(150, t0 + RECENT_FETCH), None);
        assert_eq!(unchecked.usable(150, t0), Some(7));
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
