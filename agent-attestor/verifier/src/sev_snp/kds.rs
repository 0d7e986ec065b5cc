//! Optional AMD KDS fetching (`kds_fetch = true`): the VCEK, the cert_chain (ASK/ASVK and
//! ARK) and the CRL that a verification needs and that neither the host's certificate
//! table nor the collateral directory holds.
//!
//! URL shapes (AMD's "Versioned Chip Endorsement Key (VCEK) Certificate and KDS Interface
//! Specification", as go-sev-guest and virtee's snpguest build them):
//!
//! - VCEK: `{kds_url}/vcek/v1/{Milan|Genoa}/{hwid}?blSPL=NN&teeSPL=NN&snpSPL=NN&ucodeSPL=NN`,
//!   hwid = the report's 64-byte chip_id in hex; Turin:
//!   `{kds_url}/vcek/v1/Turin/{hwid}?fmcSPL=NN&blSPL=NN&teeSPL=NN&snpSPL=NN&ucodeSPL=NN`
//!   with hwid = the first 8 bytes of chip_id. SPLs are the report's reported_tcb, in
//!   decimal, at least two digits. The response is the DER certificate.
//! - `{kds_url}/{vcek|vlek}/v1/{product}/cert_chain`: PEM, ASK (or ASVK) then ARK.
//! - `{kds_url}/{vcek|vlek}/v1/{product}/crl`: the ARK's CRL, DER.
//!
//! A VLEK cannot be fetched: KDS issues it only to a cloud provider authenticated with
//! AMD credentials. A fetched or cached item is used only after the same checks as
//! offline collateral (VCEK → pinned ASK → pinned ARK at the verification time, hwID and
//! TCB equal to the report's; CRL signed by a pinned ARK and current); a fetched ARK is
//! never trusted, only the compiled-in ones (or `test_roots_dir`).
//!
//! # Request budgets and bogus chip IDs
//!
//! The VCEK URL is built from the report's chip_id and reported TCB before the report is
//! authenticated (the VCEK is what authenticates it), so anyone can make the CA ask KDS
//! for made-up chips. That must not starve genuine nodes, so requests go to three
//! budgets ([`fetch::Pool`]) that cannot drain each other:
//!
//! - the VCEK of a chip never seen to verify: the open budget (30 a minute, 4 at once),
//!   the only one a flood of bogus chip IDs can spend;
//! - the VCEK of a *known-good* chip, one whose report passed a full verification
//!   (signature, report_data binding, policy) through [`super::SnpVerifier`], so that it
//!   gets a new TCB's VCEK (after a firmware update) during a flood: the known-chip budget
//!   (30 a minute, 2 at once). At most [`MAX_KNOWN_CHIPS`] chips are remembered (the
//!   least recently verified forgotten first), in memory only; each gets at most
//!   [`KNOWN_CHIP_FETCHES_PER_HOUR`] requests from this budget an hour, then falls back to
//!   the open one: reports forged with a known chip's ID and made-up TCBs spend that
//!   chip's quota, and only someone who knows the IDs of many verified chips can spend
//!   this budget (chip IDs are not secret: they are selectors);
//! - the cert_chain and CRL, one fixed URL per product (Milan, Genoa or Turin only, so a
//!   forged issuer name cannot make up URLs) and key kind: the fixed-URL budget (30 a
//!   minute, 2 at once), so nothing an attacker sends keeps the CRL from being refreshed.
//!   A fetched cert_chain whose signing key is current under a pinned ARK is cached even
//!   when it does not fit the VEK at hand, and while such a cached chain is less than
//!   [`CERT_CHAIN_REFRESH`] old a VEK it does not fit is refused from the cache: a forged
//!   issuer costs at most one request a day per URL.
//!
//! A URL KDS answered "not found" (404, or 400) is not asked again for an hour (at most
//! 4096 remembered), so repeating a bogus chip ID costs no request; other failures are
//! not asked again for 60 s. Outbound requests stay bounded by the three budgets together
//! (90 a minute, 8 at once) and memory by the bounds above.
//!
//! What a flood can still delay is the first fetch for a chip never verified before (its
//! VCEK competes in the open budget): give such nodes their VCEK in the host's
//! certificate table or in `collateral_dir`, or verify them once before, and they need no
//! open-budget request. Cached VCEKs (on disk) are used without any request; a restart
//! forgets only which chips are known-good. A fetched VCEK is written to the disk cache
//! only once it signed the report at hand: KDS issues a genuine VCEK for a real chip ID
//! at any TCB, so reports naming a known chip with made-up TCBs would otherwise add a
//! file each; such VCEKs are kept in memory instead ([`MAX_UNSIGNED_VCEKS`], the oldest
//! forgotten first), so sending the same forged report again costs no request.
//!
//! Cache layout under `kds_cache_dir`: `{product}/vcek-{hwid}-{tcb}.der` (tcb like
//! `bl03-tee00-snp08-uc115`, `fmc01-` first on Turin), `{product}/{vcek|vlek}-cert_chain.pem`,
//! `{product}/{vcek|vlek}-crl.der`. A cached file is used without a request while it
//! passes those checks at the verification time; otherwise it is fetched again.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::fetch::{self, Cache, Pool};
use crate::Error;
use ztid_attestation::RefusalKind::{
    self, CollateralUnavailable, KeyMismatch, Malformed, UntrustedChain,
};

use super::certs::{AmdCert, AmdCrl, Anchor, Role, TrustStore};
use super::collateral::Collateral;
use super::report::{product_of_cpuid, turin_layout, Report, SigningKey, Tcb};
use super::verify::{hwid_matches, select_vek, signing_keys};

/// AMD's KDS.
pub(crate) const DEFAULT_KDS_URL: &str = "https://kdsintf.amd.com";

/// `[attestors.sev_snp]` fetching settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KdsConfig {
    pub base_url: String,
    pub cache_dir: PathBuf,
    pub crl: bool,
}

/// Most known-good chips remembered (about 100 bytes each).
pub(crate) const MAX_KNOWN_CHIPS: usize = 4096;
/// Most VCEK requests of one known-good chip charged to the known-chip budget per hour: a
/// genuine chip needs one per TCB change (two for a version 2 report, whose product is
/// guessed).
pub(crate) const KNOWN_CHIP_FETCHES_PER_HOUR: usize = 4;

/// How long a cached cert_chain that is current but does not fit a VEK answers for KDS:
/// after that it is asked again (AMD may have issued a new signing key).
const CERT_CHAIN_REFRESH: Duration = Duration::from_secs(24 * 3600);

/// The products KDS serves; a cert_chain is fetched only for one of these, so a forged
/// issuer name cannot make up URLs.
const KDS_PRODUCTS: [&str; 3] = ["Milan", "Genoa", "Turin"];

/// The KDS client with its cache.
pub(crate) struct Kds {
    base: String,
    cache: Cache,
    crl: bool,
    client: fetch::Client,
    known: Mutex<KnownChips>,
    /// VCEKs fetched for reports they did not sign, by cache name (see [`Unsigned`]).
    unsigned: Mutex<Unsigned>,
}

/// Most fetched VCEKs kept in memory for reports they did not sign.
const MAX_UNSIGNED_VCEKS: usize = 256;

/// Genuine VCEKs fetched for reports they did not sign (a known chip's ID with a made-up
/// TCB, or a forged signature): kept in memory, bounded (the oldest forgotten first), so
/// the same forged report costs no second request, and never written to the disk cache,
/// which takes only a VCEK that signed a report.
#[derive(Default)]
struct Unsigned {
    by_name: HashMap<String, (Instant, Vec<u8>)>,
}

impl Unsigned {
    fn get(&self, rel: &str) -> Option<Vec<u8>> {
        self.by_name.get(rel).map(|(_, der)| der.clone())
    }

    fn keep(&mut self, rel: &str, der: &[u8], now: Instant) {
        if !self.by_name.contains_key(rel) {
            fetch::make_room(&mut self.by_name, MAX_UNSIGNED_VCEKS, |(at, _)| *at);
        }
        self.by_name.insert(rel.to_string(), (now, der.to_vec()));
    }
}

/// Chips (by hwID: 64 bytes, 8 on Turin) whose reports passed a full verification.
type KnownChips = fetch::KnownSources<Vec<u8>>;

fn known_chips() -> KnownChips {
    fetch::KnownSources::new(
        Pool::KnownChip,
        MAX_KNOWN_CHIPS,
        KNOWN_CHIP_FETCHES_PER_HOUR,
    )
}

fn refuse(kind: RefusalKind, m: impl Into<String>) -> Error {
    Error::refused(kind, m)
}

/// The message of an error, without the "attestation refused:" prefix.
fn reason(e: Error) -> String {
    match e {
        Error::Refused(r) => r.detail,
        Error::Config(m) => m,
        e => e.to_string(),
    }
}

/// A refusal for fetched collateral that fails its check, worded by `f` from the
/// check's reason: a refusal keeps its kind; bytes that are no certificate or CRL at all
/// (a config error from the parser) are malformed.
fn fetched_fails(e: Error, f: impl FnOnce(String) -> String) -> Error {
    let kind = e.refusal_kind().unwrap_or(Malformed);
    refuse(kind, f(reason(e)))
}

/// `blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..`, with `fmcSPL` first when present.
fn spl_query(tcb: &Tcb) -> String {
    let fmc = tcb
        .fmc
        .map(|f| format!("fmcSPL={f:02}&"))
        .unwrap_or_default();
    format!(
        "{fmc}blSPL={:02}&teeSPL={:02}&snpSPL={:02}&ucodeSPL={:02}",
        tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode
    )
}

/// The hwID KDS indexes a chip by: all 64 bytes of chip_id, or the first 8 on Turin.
fn hwid_of<'a>(product: &str, chip_id: &'a [u8; 64]) -> &'a [u8] {
    if turin_layout(product) {
        &chip_id[..8]
    } else {
        &chip_id[..]
    }
}

/// The VCEK URL for a chip at a TCB (`tcb` decoded with `product`'s layout).
pub(crate) fn vcek_url(base: &str, product: &str, chip_id: &[u8; 64], tcb: &Tcb) -> String {
    format!(
        "{base}/vcek/v1/{product}/{}?{}",
        hex::encode(hwid_of(product, chip_id)),
        spl_query(tcb)
    )
}

fn kind_of(role: &Role) -> &'static str {
    if *role == Role::Vlek {
        "vlek"
    } else {
        "vcek"
    }
}

/// `{base}/{vcek|vlek}/v1/{product}/cert_chain`.
pub(crate) fn cert_chain_url(base: &str, kind: &str, product: &str) -> String {
    format!("{base}/{kind}/v1/{product}/cert_chain")
}

/// `{base}/{vcek|vlek}/v1/{product}/crl`.
pub(crate) fn crl_url(base: &str, kind: &str, product: &str) -> String {
    format!("{base}/{kind}/v1/{product}/crl")
}

fn tcb_tag(tcb: &Tcb) -> String {
    let fmc = tcb.fmc.map(|f| format!("fmc{f:02}-")).unwrap_or_default();
    format!(
        "{fmc}bl{:02}-tee{:02}-snp{:02}-uc{:02}",
        tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode
    )
}

/// True if `c` is the VCEK of the report's chip at its reported TCB.
fn vcek_fits(c: &AmdCert, report: &Report<'_>) -> bool {
    let Some(hw) = c.hwid.as_deref() else {
        return false;
    };
    if c.role != Role::Vcek || !hwid_matches(hw, &report.parsed.chip_id) {
        return false;
    }
    let turin = hw.len() == 8;
    c.certified_tcb(turin).ok() == Some(report.reported_tcb(turin))
}

/// Products to ask KDS for: the report's CPUID names it (v3 and later); otherwise the
/// configured `products`, else Milan then Genoa (version 2 reports predate Turin).
fn candidates(report: &Report<'_>, hint: &[String]) -> Vec<&'static str> {
    let r = &report.parsed;
    if let (Some(f), Some(m)) = (r.cpuid_fam_id, r.cpuid_mod_id) {
        if let Some(p) = product_of_cpuid(f, m) {
            return vec![p];
        }
    }
    let hinted: Vec<&'static str> = ["Milan", "Genoa", "Turin"]
        .into_iter()
        .filter(|p| hint.iter().any(|h| h.eq_ignore_ascii_case(p)))
        .collect();
    if hinted.is_empty() {
        vec!["Milan", "Genoa"]
    } else {
        hinted
    }
}

/// The product in a signing key's name (`SEV-Milan`, `SEV-VLEK-Genoa`).
fn product_of_issuer(cn: &str) -> Option<&'static str> {
    let p = cn
        .strip_prefix("SEV-VLEK-")
        .or_else(|| cn.strip_prefix("SEV-"))?;
    KDS_PRODUCTS.into_iter().find(|k| *k == p)
}

impl Kds {
    pub(crate) fn new(cfg: &KdsConfig) -> Self {
        Self {
            base: cfg.base_url.clone(),
            cache: Cache::new(cfg.cache_dir.clone()),
            crl: cfg.crl,
            client: fetch::Client::default(),
            known: Mutex::new(known_chips()),
            unsigned: Mutex::new(Unsigned::default()),
        }
    }

    /// Records that a report of the chip with this hwID passed a full verification, so
    /// its VCEK fetches (after a TCB change) are charged to the known-chip budget.
    pub(crate) fn remember_verified_chip(&self, hwid: &[u8]) {
        if let Ok(mut k) = self.known.lock() {
            k.remember(hwid, Instant::now());
        }
    }

    /// GETs the VCEK `url` of the chip `hwid`, from the known-chip budget while the chip
    /// is known-good and within its quota, else from the open budget.
    ///
    /// KDS's "not found" for a known chip is remembered only as a failure (60 s), not
    /// for an hour: whoever guesses a known chip's next TCB and asks for it before AMD
    /// publishes it must not lock the chip out for an hour after its firmware update.
    fn get_vcek(&self, url: &str, hwid: &[u8]) -> Result<fetch::Response, fetch::FetchError> {
        let (pool, known) = self
            .known
            .lock()
            .map(|mut k| (k.pool_for(hwid, Instant::now()), k.contains(hwid)))
            .unwrap_or((Pool::Open, false));
        let got = if known {
            self.client.get_pcs(url, pool)
        } else {
            self.client.get_in(url, pool)
        };
        let made = !matches!(got, Err(fetch::FetchError::NotMade { .. }));
        if pool == Pool::KnownChip && made {
            if let Ok(mut k) = self.known.lock() {
                k.count_fetch(hwid, Instant::now());
            }
        }
        got
    }

    /// True if `bytes` (a cert_chain) hold a signing key signed by a pinned ARK and
    /// valid at `at`, whatever VEK is being checked.
    fn chain_is_current(store: &TrustStore, name: &str, bytes: &[u8], at: i64) -> bool {
        let mut got = Collateral::default();
        got.add_blob(name, bytes, true).is_ok()
            && got.certs.iter().any(|x| {
                matches!(x.role, Role::Ask(_) | Role::Asvk(_))
                    && store.check_signing_key(x, at).is_ok()
            })
    }

    /// True if the cache entry `rel` was written less than [`CERT_CHAIN_REFRESH`] ago.
    fn cached_recently(&self, rel: &str) -> bool {
        std::fs::metadata(self.cache.path(rel))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < CERT_CHAIN_REFRESH)
    }

    /// Creates the cache directory (0700).
    pub(crate) fn create_cache(&self) -> Result<(), Error> {
        self.cache.create()
    }

    fn store_in_cache(&self, rel: &str, bytes: &[u8]) {
        if let Err(e) = self.cache.write(rel, bytes) {
            tracing::warn!(error = %e, "sev-snp: could not cache collateral fetched from AMD KDS");
        }
    }

    /// Adds to `c` what the report's verification needs and `c` lacks, from the cache or
    /// from KDS. Reports that do not parse are left to the verification to refuse.
    pub(crate) fn complete(
        &self,
        store: &TrustStore,
        c: &mut Collateral,
        raw: &[u8],
        at: i64,
        hint: &[String],
    ) -> Result<(), Error> {
        let Ok(report) = Report::parse(raw) else {
            return Ok(());
        };
        let Ok(key) = report.signing_key() else {
            return Ok(());
        };
        match key {
            SigningKey::Vlek => {
                if !c.certs.iter().any(|x| x.role == Role::Vlek) {
                    return Err(refuse(
                        CollateralUnavailable,
                        "the report is signed by a VLEK, but neither the evidence nor the collateral holds a VLEK certificate; \
                         a VLEK cannot be fetched from AMD KDS (KDS gives it only to the cloud provider, with AMD credentials): \
                         put it in collateral_dir or have the host include it in the certificate table",
                    ));
                }
            }
            SigningKey::Vcek => {
                if !c.certs.iter().any(|x| vcek_fits(x, &report)) {
                    let v = self.vcek(store, c, &report, at, hint)?;
                    c.certs.insert(0, v);
                }
            }
        }
        let Ok((vek, _)) = select_vek(c, &report.parsed.chip_id, key) else {
            return Ok(());
        };
        let vek = vek.clone();
        self.ensure_signing_key(store, c, &vek, at)?;
        if self.crl {
            let inters = signing_keys(c);
            let Ok(chain) = store.check_vek(&vek, &inters, at) else {
                return Ok(()); // the verification says why
            };
            // Only a CRL the CA keeps current itself (collateral_dir) makes the fetch
            // unnecessary: one from the node's certificate table may be an older genuine
            // CRL that predates a revocation. The node's CRLs are still applied besides.
            if !c
                .crls
                .iter()
                .any(|crl| crl.ca_source && crl.issuer_raw == chain.anchor.ark.subject_raw)
            {
                let crl = self.crl(store, kind_of(&vek.role), &chain.product, chain.anchor, at)?;
                c.crls.push(crl);
            }
        }
        Ok(())
    }

    /// The report's VCEK from the cache or KDS, checked.
    fn vcek(
        &self,
        store: &TrustStore,
        c: &mut Collateral,
        report: &Report<'_>,
        at: i64,
        hint: &[String],
    ) -> Result<AmdCert, Error> {
        let chip_id = &report.parsed.chip_id;
        if chip_id.iter().all(|b| *b == 0) {
            return Err(refuse(
                CollateralUnavailable,
                "the report is signed by a VCEK that neither the evidence nor the collateral holds, \
                 and its chip_id is zero (masked), so the VCEK cannot be fetched from AMD KDS",
            ));
        }
        let mut failures = Vec::new();
        for product in candidates(report, hint) {
            let tcb = report.reported_tcb(turin_layout(product));
            let url = vcek_url(&self.base, product, chip_id, &tcb);
            let rel = format!(
                "{product}/vcek-{}-{}.der",
                hex::encode(hwid_of(product, chip_id)),
                tcb_tag(&tcb)
            );
            if let Some(bytes) = self.cache.read(&rel) {
                let name = self.cache.path(&rel).display().to_string();
                match self.check_vcek(store, c, &name, &bytes, report, at) {
                    Ok(v) => return Ok(v),
                    Err(e) => tracing::info!(
                        file = %name,
                        reason = %reason(e),
                        "sev-snp: cached VCEK not usable at the verification time; fetching it again"
                    ),
                }
            }
            let kept = self.unsigned.lock().ok().and_then(|u| u.get(&rel));
            let body = match kept {
                Some(der) => der,
                None => match self.get_vcek(&url, hwid_of(product, chip_id)) {
                    Err(e) => {
                        failures.push(e.to_string());
                        continue;
                    }
                    Ok(resp) => resp.body,
                },
            };
            let v = self
                .check_vcek(store, c, &url, &body, report, at)
                .map_err(|e| {
                    fetched_fails(e, |r| {
                        format!("the VCEK fetched from {url} fails verification: {r}")
                    })
                })?;
            // On disk only once it signed this report: KDS issues a genuine VCEK for a
            // real chip ID at any TCB, so reports naming a known chip with made-up TCBs
            // would otherwise fill the cache (they are kept in memory, bounded, instead).
            if let Err(e) = report.check_signature(&v.public_key, "VCEK") {
                if let Ok(mut u) = self.unsigned.lock() {
                    u.keep(&rel, &v.der, Instant::now());
                }
                return Err(e);
            }
            if let Ok(mut u) = self.unsigned.lock() {
                u.by_name.remove(&rel);
            }
            self.store_in_cache(&rel, &v.der);
            return Ok(v);
        }
        Err(refuse(CollateralUnavailable, format!(
            "the report is signed by a VCEK that neither the evidence nor the collateral holds, and fetching it from AMD KDS failed: {}",
            failures.join("; ")
        )))
    }

    /// Parses a VCEK and checks it fits the report and chains to a pinned ARK at `at`.
    fn check_vcek(
        &self,
        store: &TrustStore,
        c: &mut Collateral,
        name: &str,
        bytes: &[u8],
        report: &Report<'_>,
        at: i64,
    ) -> Result<AmdCert, Error> {
        let mut got = Collateral::default();
        got.add_blob(name, bytes, true)?;
        let v = got
            .certs
            .into_iter()
            .find(|x| x.role == Role::Vcek)
            .ok_or_else(|| refuse(Malformed, format!("{name} holds no VCEK certificate")))?;
        if !vcek_fits(&v, report) {
            return Err(refuse(
                KeyMismatch,
                format!(
                    "{name} is not the VCEK of the report's chip at its reported TCB (hwID {})",
                    v.hwid.as_deref().map(hex::encode).unwrap_or_default()
                ),
            ));
        }
        self.ensure_signing_key(store, c, &v, at)?;
        store.check_vek(&v, &signing_keys(c), at)?;
        Ok(v)
    }

    /// Fetches the cert_chain when `vek`'s signing key is neither pinned nor in `c`, and
    /// adds the signing key to `c` once it verifies under a pinned ARK.
    fn ensure_signing_key(
        &self,
        store: &TrustStore,
        c: &mut Collateral,
        vek: &AmdCert,
        at: i64,
    ) -> Result<(), Error> {
        let known = store
            .intermediates
            .iter()
            .map(|i| &i.cert)
            .chain(
                c.certs
                    .iter()
                    .filter(|x| matches!(x.role, Role::Ask(_) | Role::Asvk(_))),
            )
            .any(|x| x.subject_raw == vek.issuer_raw);
        if known || !matches!(vek.role, Role::Vcek | Role::Vlek) {
            return Ok(());
        }
        let Some(product) = product_of_issuer(&vek.issuer_cn) else {
            return Ok(()); // the chain check names the unknown issuer
        };
        let kind = kind_of(&vek.role);
        let url = cert_chain_url(&self.base, kind, product);
        let rel = format!("{product}/{kind}-cert_chain.pem");
        let check = |name: &str, bytes: &[u8]| -> Result<AmdCert, Error> {
            let mut got = Collateral::default();
            got.add_blob(name, bytes, true)?;
            let sk = got
                .certs
                .into_iter()
                .find(|x| {
                    x.subject_raw == vek.issuer_raw
                        && matches!(x.role, Role::Ask(_) | Role::Asvk(_))
                })
                .ok_or_else(|| {
                    refuse(
                        UntrustedChain,
                        format!("{name} holds no signing key named {:?}", vek.issuer_cn),
                    )
                })?;
            store.check_vek_under(vek, &sk, None, at)?;
            Ok(sk)
        };
        if let Some(bytes) = self.cache.read(&rel) {
            let name = self.cache.path(&rel).display().to_string();
            match check(&name, &bytes) {
                Ok(sk) => {
                    c.certs.push(sk);
                    return Ok(());
                }
                // KDS serves one cert_chain per product: while the cached one is current
                // and recent, asking again returns the same keys, so the VEK is at fault
                // (a forged issuer, as a flood sends) and costs no request.
                Err(e)
                    if Self::chain_is_current(store, &name, &bytes, at)
                        && self.cached_recently(&rel) =>
                {
                    return Err(e)
                }
                Err(e) => tracing::info!(
                    file = %name,
                    reason = %reason(e),
                    "sev-snp: cached cert_chain not usable at the verification time; fetching it again"
                ),
            }
        }
        let resp = self.client.get_in(&url, Pool::FixedUrl).map_err(|e| {
            refuse(CollateralUnavailable, format!(
                "the {} is signed by {:?}, which is neither pinned nor in the collateral, and fetching the cert_chain from AMD KDS failed: {e}",
                vek.role.label(),
                vek.issuer_cn
            ))
        })?;
        let sk = check(&url, &resp.body).map_err(|e| {
            // A current chain that does not fit this VEK is kept all the same, so the
            // next VEK naming this issuer is answered from the cache, not by KDS again.
            if Self::chain_is_current(store, &url, &resp.body, at) {
                self.store_in_cache(&rel, &resp.body);
            }
            fetched_fails(e, |r| {
                format!("the cert_chain fetched from {url} fails verification: {r}")
            })
        })?;
        self.store_in_cache(&rel, &resp.body);
        c.certs.push(sk);
        Ok(())
    }

    /// The CRL of `anchor` for `product`, from the cache or KDS, signed by that ARK and
    /// current at `at`.
    fn crl(
        &self,
        store: &TrustStore,
        kind: &str,
        product: &str,
        anchor: &Anchor,
        at: i64,
    ) -> Result<AmdCrl, Error> {
        if product.is_empty() || !product.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(refuse(
                CollateralUnavailable,
                format!("cannot fetch a CRL for the product name {product:?}"),
            ));
        }
        let url = crl_url(&self.base, kind, product);
        let rel = format!("{product}/{kind}-crl.der");
        let check = |name: &str, bytes: &[u8]| -> Result<AmdCrl, Error> {
            let mut got = Collateral::default();
            got.add_blob(name, bytes, true)?;
            let crl = got
                .crls
                .into_iter()
                .next()
                .ok_or_else(|| refuse(Malformed, format!("{name} holds no CRL")))?;
            let issuer = store.check_crl(&crl, at)?;
            if !std::ptr::eq(issuer, anchor) {
                return Err(refuse(
                    UntrustedChain,
                    format!(
                        "CRL {name} is issued by {}, not by {}",
                        issuer.ark.subject_cn, anchor.ark.subject_cn
                    ),
                ));
            }
            Ok(crl.trusted_by_ca())
        };
        if let Some(bytes) = self.cache.read(&rel) {
            let name = self.cache.path(&rel).display().to_string();
            match check(&name, &bytes) {
                Ok(crl) => return Ok(crl),
                Err(e) => tracing::info!(
                    file = %name,
                    reason = %reason(e),
                    "sev-snp: cached CRL not usable at the verification time; fetching it again"
                ),
            }
        }
        let resp = self.client.get_in(&url, Pool::FixedUrl).map_err(|e| {
            refuse(
                CollateralUnavailable,
                format!(
                    "the collateral holds no CRL from {} and fetching it from AMD KDS failed: {e}",
                    anchor.ark.subject_cn
                ),
            )
        })?;
        let crl = check(&url, &resp.body).map_err(|e| {
            fetched_fails(e, |r| {
                format!("the CRL fetched from {url} fails verification: {r}")
            })
        })?;
        self.store_in_cache(&rel, &resp.body);
        Ok(crl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::HOUR;

    fn chip() -> [u8; 64] {
        let mut c = [0u8; 64];
        for (i, b) in c.iter_mut().enumerate() {
            *b = i as u8;
        }
        c
    }

    #[test]
    fn vcek_urls_per_product() {
        let base = "https://kdsintf.amd.com";
        let legacy = Tcb::decode(&[3, 0, 0, 0, 0, 0, 8, 115], false);
        let hex64 = hex::encode(chip());
        assert_eq!(
            vcek_url(base, "Milan", &chip(), &legacy),
            format!("https://kdsintf.amd.com/vcek/v1/Milan/{hex64}?blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=115")
        );
        let genoa = Tcb::decode(&[10, 0, 0, 0, 0, 0, 23, 84], false);
        assert_eq!(
            vcek_url(base, "Genoa", &chip(), &genoa),
            format!("https://kdsintf.amd.com/vcek/v1/Genoa/{hex64}?blSPL=10&teeSPL=00&snpSPL=23&ucodeSPL=84")
        );
        // Turin: 8-byte hwID, fmcSPL first, Turin byte layout.
        let turin = Tcb::decode(&[1, 2, 3, 4, 0, 0, 0, 81], true);
        assert_eq!(
            vcek_url(base, "Turin", &chip(), &turin),
            "https://kdsintf.amd.com/vcek/v1/Turin/0001020304050607?fmcSPL=01&blSPL=02&teeSPL=03&snpSPL=04&ucodeSPL=81"
        );
        assert_eq!(
            cert_chain_url(base, "vcek", "Genoa"),
            "https://kdsintf.amd.com/vcek/v1/Genoa/cert_chain"
        );
        assert_eq!(
            crl_url(base, "vlek", "Milan"),
            "https://kdsintf.amd.com/vlek/v1/Milan/crl"
        );
        assert_eq!(tcb_tag(&legacy), "bl03-tee00-snp08-uc115");
        assert_eq!(tcb_tag(&turin), "fmc01-bl02-tee03-snp04-uc81");
    }

    #[test]
    fn unsigned_vceks_in_memory_are_bounded() {
        let mut u = Unsigned::default();
        let t0 = Instant::now();
        for i in 0..=MAX_UNSIGNED_VCEKS {
            u.keep(&format!("v{i}"), &[1], t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(u.by_name.len(), MAX_UNSIGNED_VCEKS);
        assert!(u.get("v0").is_none(), "the oldest is forgotten");
        assert_eq!(u.get(&format!("v{MAX_UNSIGNED_VCEKS}")), Some(vec![1]));
    }

    #[test]
    fn known_chips_have_a_bounded_quota_and_a_bounded_list() {
        let mut k = known_chips();
        let t0 = Instant::now();
        assert_eq!(k.pool_for(&b"unknown"[..], t0), Pool::Open);
        k.remember(&b"chip"[..], t0);
        // A known chip draws on its budget a few times an hour, then on the open one, so
        // reports forged with its ID and made-up TCBs cannot spend the known-chip budget.
        for _ in 0..KNOWN_CHIP_FETCHES_PER_HOUR {
            assert_eq!(k.pool_for(&b"chip"[..], t0), Pool::KnownChip);
            k.count_fetch(&b"chip"[..], t0);
        }
        assert_eq!(k.pool_for(&b"chip"[..], t0), Pool::Open);
        assert_eq!(k.pool_for(&b"chip"[..], t0 + HOUR), Pool::KnownChip);
        // The list is bounded: the least recently verified chip is forgotten first.
        for i in 0..MAX_KNOWN_CHIPS {
            k.remember(
                &(i as u32).to_be_bytes()[..],
                t0 + Duration::from_millis(1 + i as u64),
            );
        }
        assert_eq!(k.len(), MAX_KNOWN_CHIPS);
        assert!(!k.contains(&b"chip"[..]));
        assert_eq!(k.pool_for(&b"chip"[..], t0 + HOUR), Pool::Open);
        assert!(k.contains(&1u32.to_be_bytes()[..]));
    }

    #[test]
    fn issuer_products() {
        assert_eq!(product_of_issuer("SEV-Milan"), Some("Milan"));
        assert_eq!(product_of_issuer("SEV-VLEK-Genoa"), Some("Genoa"));
        assert_eq!(product_of_issuer("SEV-../x"), None);
        assert_eq!(product_of_issuer("Intel"), None);
        // Only the products KDS serves: a forged issuer cannot make up cert_chain URLs.
        assert_eq!(product_of_issuer("SEV-Bogus1234"), None);
        assert_eq!(product_of_issuer("SEV-VLEK-Turin"), Some("Turin"));
    }
}
