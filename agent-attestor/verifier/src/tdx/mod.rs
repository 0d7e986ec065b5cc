//! `tdx` node attestation: an Intel TDX trust domain proves its measurements (MRTD,
//! RTMR0-3, MRCONFIGID) and its platform TCB with a DCAP quote.
//!
//! # Protocol
//!
//! As for `sev-snp` (see [`super::tsm`]): empty initial evidence, a challenge of nonce and
//! agent CSR key, and a quote from configfs-tsm whose report_data is
//! `SHA-512(nonce ‖ SPKI)`. The CA then checks, in this order:
//!
//! 1. the quote header: version 4 or 5, TEE type TDX (an SGX quote is refused as not TDX);
//! 2. through [`dcap_qvl`] (pure Rust, offline, with the clock as a parameter): the PCK
//!    chain to the pinned Intel SGX Root CA, the root and PCK CRLs, the TCB info and QE
//!    identity signatures, issuers and validity windows, the QE report signature and its
//!    binding of the attestation key, the quote signature, the platform, QE and TDX
//!    module TCB levels, and the TD attributes (no debug, no migration, SEPT_VE_DISABLE);
//! 3. the merged TCB status against `accepted_tcb_status`, and no advisory from
//!    `denied_advisories`;
//! 4. the TD is not a debug TD (TD_ATTRIBUTES bit 0), checked here as well;
//! 5. all 64 bytes of report_data;
//! 6. the MRTD, RTMR and MRCONFIGID allow-lists.
//!
//! # Collateral
//!
//! Intel's collateral for the quote's platform (FMSPC), in dcap-qvl's `QuoteCollateralV3`
//! JSON: `DIR/collateral-<fmspc>.json` when present (one file per platform model in a
//! mixed fleet), else `DIR/collateral.json`. It is read at every verification, so a
//! refreshed file (TCB info and QE identity are valid for about 30 days) takes effect
//! without a restart.
//!
//! What is parsed from a collateral file (the JSON, the dates of its four dated items) is
//! kept per verifier and file, with the file's exact bytes (at most
//! 64 files): it is used only while the bytes read at a
//! verification equal those bytes, so any changed byte is parsed afresh. (A byte
//! comparison binds at least as much as a digest, and costs a microsecond where
//! SHA-256 of the ~20 KB file costs fifteen.) The dates are compared with the
//! verification time on every call, and dcap-qvl verifies every signature, chain and
//! CRL of the collateral with each quote (its API has no step that takes collateral
//! verified earlier). Whether the directory holds `collateral-<fmspc>.json`
//! files is remembered per directory modification time (listed again while that time is
//! less than 2 s old, so a change within the file system's timestamp granularity is not
//! missed); only when it holds some is the quote's PCK certificate parsed for its FMSPC.
//!
//! Fetching from Intel PCS is optional and off by default: with `pcs_fetch` unset or
//! `false` nothing is ever fetched. With `pcs_fetch = true`, a quote whose FMSPC has no
//! collateral in the directory (no `collateral-<fmspc>.json`, and no `collateral.json`
//! for that FMSPC) uses `{pcs_cache_dir}/collateral-<fmspc>-<pck ca>.json` while every dated
//! item in it is current at the verification time, and otherwise fetches the PCK CRL,
//! TCB info, QE identity and root CA CRL (10 s timeout, 1 MiB cap per request) and
//! verifies the quote with them exactly as with offline collateral. Request shapes and
//! bounds: see `pcs.rs`.
//!
//! The quote is unauthenticated when that happens, and the TCB info URL is built from
//! the FMSPC in its PCK certificate. So before any request the quote's PCK certificate
//! chain must verify to the pinned Intel SGX Root CA (signatures, issuer names, validity
//! at the verification time; see `chain.rs`), and the FMSPC and PCK CA are read from the
//! verified certificate; otherwise the quote is refused ([`UntrustedChain`]) and nothing
//! is fetched. The fixed URLs (PCK CRL, QE identity, root CA CRL) draw on their own
//! budget and are kept in memory while current; the TCB info of a platform whose quote
//! passed a full verification ("known platform", in memory, bounded) on a known-platform
//! budget, others on the open one. Fetched collateral whose every item checks out
//! (issuer chains to the pinned root, signatures, dates, FMSPC) is cached at once, even
//! when the quote that caused the fetch fails; other fetched collateral only once a
//! quote verified with it. Replays of a genuine PCK certificate with garbage quotes thus
//! fetch a platform's collateral once per validity period.
//!
//! # Configuration (`[attestors.tdx]`)
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `collateral_dir` | the collateral directory (`--tdx-collateral`) | required unless `pcs_fetch` |
//! | `pcs_fetch` | fetch missing collateral from Intel PCS, and cache it | `false` |
//! | `pcs_url` | PCS (or PCCS) base URL (`https://`; `http://` only because it is explicit) | `https://api.trustedservices.intel.com` |
//! | `pcs_root_ca_crl_url` | where the Intel SGX Root CA CRL is fetched | `https://certificates.trustedservices.intel.com/IntelSGXRootCA.der` |
//! | `pcs_cache_dir` | where fetched collateral is kept (created 0700); required with `pcs_fetch` | none |
//! | `accepted_tcb_status` | TCB statuses accepted (`UpToDate`, `SWHardeningNeeded`, `ConfigurationNeeded`, `ConfigurationAndSWHardeningNeeded`, `OutOfDate`, `OutOfDateConfigurationNeeded`, `TDRelaunchAdvised`, `TDRelaunchAdvisedConfigurationNeeded`; `Revoked` never is) | `["UpToDate"]` |
//! | `denied_advisories` | Intel advisory IDs (`INTEL-SA-00615`) refused whatever the status | none |
//! | `mrtd` | allow-list of MRTD values (96 hex digits) | any |
//! | `rtmr0` .. `rtmr3` | allow-lists of each RTMR (96 hex digits) | any |
//! | `mrconfigid` | allow-list of MRCONFIGID values (96 hex digits) | any |
//!
//! # Node ID and selectors
//!
//! A TD 1.5 "ex" report carries TD_ID, which the TDX module regenerates at every TD
//! launch (and keeps across TD-preserving updates and migration), and VMID, which names
//! the VM of a partitioned TD the report is for (0: an unpartitioned TD or the L1 VMM;
//! 1-3: its L2 VMs, which share the TD's TD_ID). The node ID is then the hex of the first
//! 16 bytes of `SHA-256("ztid/tdx/node-id/v1/td-id" ‖ TD_ID)` for VMID 0 and of
//! `SHA-256("ztid/tdx/node-id/v1/td-id-vmid" ‖ VMID ‖ TD_ID)` (VMID as one byte)
//! otherwise: one per VM launch, and one per VM of a partitioned TD. Older reports (TD
//! 1.0 and 1.5) have no per-launch value at all: the node ID is then the same digest
//! (domain `.../v1/config`) over the platform's PPID, MRTD, RTMR0-2 (firmware, kernel
//! and command line: fixed after boot; RTMR3 is left out since the running system
//! extends it), MRCONFIGID, MROWNER and MROWNERCONFIG. Identical TDs
//! on one host then share an identity; to tell their launches apart, the orchestrator
//! gives each launch its own MRCONFIGID (or MROWNER), which the host sets at TD creation.
//! Selectors: `tdx:mrtd:<hex>`, `tdx:rtmr0:<hex>` .. `tdx:rtmr3:<hex>`,
//! `tdx:mrconfigid:<hex>`, from the verified quote only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use dcap_qvl::quote::{Quote, Report, TDReport10};
use dcap_qvl::verify::VerifiedReport;
use dcap_qvl::QuoteCollateralV3;
use ring::digest;

mod chain;
mod pcs;

use pcs::{Pcs, PcsConfig};

pub use ztid_attestation::tdx::*;
use ztid_attestation::Error;
use ztid_attestation::RefusalKind::{self, Expired, Malformed, PolicyMismatch, UntrustedChain};
use ztid_spiffe::Selector;

use crate::tsm::{self, Pending};
use crate::{AttestationContext, AttestedNode, NodeVerifier, VerificationSession, VerifierStep};

const TCB_STATUSES: &[&str] = &[
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "TDRelaunchAdvised",
    "TDRelaunchAdvisedConfigurationNeeded",
];

const KEYS: &[&str] = &[
    "collateral_dir",
    "accepted_tcb_status",
    "denied_advisories",
    "mrtd",
    "rtmr0",
    "rtmr1",
    "rtmr2",
    "rtmr3",
    "mrconfigid",
    "pcs_fetch",
    "pcs_url",
    "pcs_root_ca_crl_url",
    "pcs_cache_dir",
];

/// The operator's policy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Policy {
    accepted_tcb_status: Vec<String>,
    denied_advisories: Vec<String>,
    mrtd: Vec<Vec<u8>>,
    rtmr: [Vec<Vec<u8>>; 4],
    mrconfigid: Vec<Vec<u8>>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            accepted_tcb_status: vec!["UpToDate".into()],
            denied_advisories: Vec::new(),
            mrtd: Vec::new(),
            rtmr: Default::default(),
            mrconfigid: Vec::new(),
        }
    }
}

struct Config {
    policy: Policy,
    collateral_dir: Option<PathBuf>,
    pcs: Option<PcsConfig>,
}

fn cfg_err(m: impl std::fmt::Display) -> Error {
    Error::Config(format!("[attestors.tdx]: {m}"))
}

fn str_list(t: &toml::Table, key: &str) -> Result<Option<Vec<String>>, Error> {
    let Some(v) = t.get(key) else {
        return Ok(None);
    };
    let bad = || cfg_err(format!("{key} must be an array of strings"));
    v.as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|x| x.as_str().map(str::to_string).ok_or_else(bad))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn hex_list(t: &toml::Table, key: &str) -> Result<Vec<Vec<u8>>, Error> {
    str_list(t, key)?
        .unwrap_or_default()
        .iter()
        .map(|s| {
            let b = hex::decode(s.trim())
                .map_err(|e| cfg_err(format!("{key}: {s:?} is not hex: {e}")))?;
            if b.len() != 48 {
                return Err(cfg_err(format!(
                    "{key}: {s:?} is {} bytes, must be 48",
                    b.len()
                )));
            }
            Ok(b)
        })
        .collect()
}

fn parse_config(t: &toml::Table) -> Result<Config, Error> {
    if let Some(k) = t.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(cfg_err(format!(
            "unknown key {k:?} (known: {})",
            KEYS.join(", ")
        )));
    }
    let mut policy = Policy::default();
    if let Some(s) = str_list(t, "accepted_tcb_status")? {
        if let Some(bad) = s.iter().find(|x| !TCB_STATUSES.contains(&x.as_str())) {
            return Err(cfg_err(format!(
                "accepted_tcb_status: {bad:?} is not one of {}",
                TCB_STATUSES.join(", ")
            )));
        }
        policy.accepted_tcb_status = s;
    }
    policy.denied_advisories = str_list(t, "denied_advisories")?.unwrap_or_default();
    policy.mrtd = hex_list(t, "mrtd")?;
    for (i, r) in policy.rtmr.iter_mut().enumerate() {
        *r = hex_list(t, &format!("rtmr{i}"))?;
    }
    policy.mrconfigid = hex_list(t, "mrconfigid")?;
    let path = |key: &str| -> Result<Option<PathBuf>, Error> {
        t.get(key)
            .map(|v| {
                v.as_str()
                    .map(PathBuf::from)
                    .ok_or_else(|| cfg_err(format!("{key} must be a path")))
            })
            .transpose()
    };
    Ok(Config {
        policy,
        collateral_dir: path("collateral_dir")?,
        pcs: pcs_config(t, path("pcs_cache_dir")?)?,
    })
}

/// The `pcs_*` keys: `None` unless `pcs_fetch = true`.
fn pcs_config(t: &toml::Table, cache_dir: Option<PathBuf>) -> Result<Option<PcsConfig>, Error> {
    let url = |key: &str, default: &str| -> Result<String, Error> {
        match t.get(key) {
            None => Ok(default.to_string()),
            Some(v) => v
                .as_str()
                .ok_or_else(|| cfg_err(format!("{key} must be a string")))
                .and_then(|u| super::fetch::base_url(key, u).map_err(cfg_err)),
        }
    };
    let base_url = url("pcs_url", pcs::DEFAULT_PCS_URL)?;
    let root_ca_crl_url = url("pcs_root_ca_crl_url", pcs::DEFAULT_ROOT_CA_CRL_URL)?;
    let fetch = t
        .get("pcs_fetch")
        .map(|v| {
            v.as_bool()
                .ok_or_else(|| cfg_err("pcs_fetch must be true or false"))
        })
        .transpose()?;
    match fetch {
        None => {
            if let Some(k) = ["pcs_url", "pcs_root_ca_crl_url", "pcs_cache_dir"]
                .into_iter()
                .find(|k| t.contains_key(*k))
            {
                return Err(cfg_err(format!(
                    "{k} is set but pcs_fetch is not: set pcs_fetch = true to fetch from Intel PCS (off by default)"
                )));
            }
            Ok(None)
        }
        Some(false) => Ok(None),
        Some(true) => Ok(Some(PcsConfig {
            base_url,
            root_ca_crl_url,
            cache_dir: cache_dir.ok_or_else(|| {
                cfg_err("pcs_fetch = true needs pcs_cache_dir (where fetched collateral is kept)")
            })?,
        })),
    }
}

/// The collateral for `quote` from `dir`: `collateral-<fmspc>.json`, else `collateral.json`.
fn load_collateral(dir: &Path, quote: &[u8]) -> Result<QuoteCollateralV3, Error> {
    read_collateral(&collateral_path(dir, quote, true))
}

/// The file [`load_collateral`] reads; the quote's FMSPC is read only when `per_fmspc`
/// (the directory may hold `collateral-<fmspc>.json` files).
fn collateral_path(dir: &Path, quote: &[u8], per_fmspc: bool) -> PathBuf {
    per_fmspc
        .then(|| {
            Quote::parse(quote)
                .ok()
                .and_then(|q| dcap_qvl::intel::quote_fmspc(&q).ok())
                .map(|f| dir.join(format!("collateral-{}.json", hex::encode(f))))
                .filter(|p| p.is_file())
        })
        .flatten()
        .unwrap_or_else(|| dir.join("collateral.json"))
}

fn read_collateral(path: &Path) -> Result<QuoteCollateralV3, Error> {
    parse_collateral(path, &read_bytes(path)?)
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(Error::io(format!(
        "reading TDX collateral {}",
        path.display()
    )))
}

fn parse_collateral(path: &Path, bytes: &[u8]) -> Result<QuoteCollateralV3, Error> {
    serde_json::from_slice(bytes).map_err(|e| {
        Error::Config(format!(
            "TDX collateral {} is not QuoteCollateralV3 JSON: {e}",
            path.display()
        ))
    })
}

/// Most collateral files a verifier keeps parsed (a fleet has one per platform model).
const COLLATERAL_CACHE_MAX: usize = 64;

/// A collateral file parsed once per exact content.
struct Parsed {
    /// The file's bytes this was parsed from.
    bytes: Vec<u8>,
    collateral: QuoteCollateralV3,
    dates: Dates,
    /// The earliest nextUpdate: later, the entry is of no use.
    expires: i64,
}

type ParsedMap = HashMap<PathBuf, Arc<Parsed>>;

/// Parsed collateral per file, each with the exact bytes it was parsed from.
#[derive(Default)]
struct CollateralCache(Mutex<ParsedMap>);

impl CollateralCache {
    fn lock(&self) -> MutexGuard<'_, ParsedMap> {
        // A panic elsewhere cannot leave the map half-updated: use it as it is.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The parsed form of `bytes`, just read from `path`: the cached one when it was
    /// parsed from these very bytes, else parsed now and kept (in place of the file's
    /// previous content; when full, entries expired at `at` go, then all).
    fn get(&self, path: &Path, bytes: &[u8], at: i64) -> Result<Arc<Parsed>, Error> {
        if let Some(p) = self.lock().get(path).filter(|p| p.bytes == bytes) {
            return Ok(p.clone());
        }
        let collateral = parse_collateral(path, bytes)?;
        let dates = collateral_dates(&collateral)?;
        let expires = dates.iter().filter_map(|d| d.2).min().unwrap_or(i64::MAX);
        let parsed = Arc::new(Parsed {
            bytes: bytes.to_vec(),
            collateral,
            dates,
            expires,
        });
        let mut map = self.lock();
        if map.len() >= COLLATERAL_CACHE_MAX && !map.contains_key(path) {
            map.retain(|_, p| p.expires >= at);
            if map.len() >= COLLATERAL_CACHE_MAX {
                map.clear();
            }
        }
        map.insert(path.to_path_buf(), parsed.clone());
        Ok(parsed)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let mut o = [0u8; 32];
    o.copy_from_slice(digest::digest(&digest::SHA256, b).as_ref());
    o
}

/// A listing is trusted only once the directory's modification time is this much older
/// than the listing: a change within the file system's timestamp granularity (a few ms)
/// could otherwise leave the time unchanged.
const LISTING_SETTLED: Duration = Duration::from_secs(2);

/// Whether the collateral directory holds `collateral-<fmspc>.json` files, per the
/// directory's modification time.
#[derive(Default)]
struct Listing(Mutex<Option<(SystemTime, bool)>>);

impl Listing {
    /// True when `dir` holds a file named `collateral-*.json`.
    fn per_fmspc_files(&self, dir: &Path) -> Result<bool, Error> {
        let mtime = std::fs::metadata(dir)
            .and_then(|m| m.modified())
            .map_err(Error::io(format!(
                "reading TDX collateral directory {}",
                dir.display()
            )))?;
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((t, any)) = *cached {
            if t == mtime {
                return Ok(any);
            }
        }
        let mut any = false;
        for e in std::fs::read_dir(dir).map_err(Error::io(format!(
            "reading TDX collateral directory {}",
            dir.display()
        )))? {
            let name = e
                .map_err(Error::io(format!(
                    "reading TDX collateral directory {}",
                    dir.display()
                )))?
                .file_name();
            let name = name.to_string_lossy();
            if name.starts_with("collateral-") && name.ends_with(".json") {
                any = true;
                break;
            }
        }
        let settled = SystemTime::now()
            .duration_since(mtime)
            .is_ok_and(|age| age >= LISTING_SETTLED);
        *cached = settled.then_some((mtime, any));
        Ok(any)
    }
}

/// The FMSPC (lowercase hex) a collateral's TCB info is for.
fn tcb_info_fmspc(c: &QuoteCollateralV3) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(&c.tcb_info).ok()?;
    v.get("fmspc")?.as_str().map(str::to_ascii_lowercase)
}

/// The collateral for `quote`: from `dir` (see [`load_collateral`]) when fetching is off.
/// With `pcs`, the directory's file for the quote's FMSPC, else the cache's while
/// current at `at`, else Intel PCS, only once the quote's PCK certificate chain verified
/// to the pinned root; the platform is returned with collateral from the cache or PCS
/// (the caller caches fetched collateral not cached yet once the quote verified with
/// it, and remembers the platform as known).
fn collateral_for(
    dir: Option<&Path>,
    pcs: Option<&Pcs>,
    quote: &[u8],
    at: i64,
) -> Result<(QuoteCollateralV3, Fetched), Error> {
    let Some(pcs) = pcs else {
        let dir = dir.ok_or_else(|| {
            Error::Config("TDX verification needs --collateral DIR (with collateral.json)".into())
        })?;
        return Ok((load_collateral(dir, quote)?, None));
    };
    let parsed = Quote::parse(quote)
        .map_err(|e| refuse(Malformed, format!("malformed TDX quote: {e:#}")))?;
    let fmspc = dcap_qvl::intel::quote_fmspc(&parsed).map_err(|e| {
        refuse(
            Malformed,
            format!("cannot read the FMSPC from the quote's PCK certificate: {e:#}"),
        )
    })?;
    if let Some(d) = dir {
        let p = d.join(pcs::file_name(&fmspc));
        if p.is_file() {
            return Ok((read_collateral(&p)?, None));
        }
        let p = d.join("collateral.json");
        if p.is_file() {
            let c = read_collateral(&p)?;
            if tcb_info_fmspc(&c).as_deref() == Some(hex::encode(fmspc).as_str()) {
                return Ok((c, None));
            }
        }
    }
    let ca = dcap_qvl::intel::quote_ca(&parsed)
        .map_err(|e| refuse(Malformed, format!("cannot read the quote's PCK CA: {e:#}")))?
        .as_id_str();
    if let Some(c) = pcs.cached(&fmspc, ca, at) {
        return Ok((
            c,
            Some(FromPcs {
                platform: (fmspc, ca),
                fetched: false,
                stored: true,
            }),
        ));
    }
    // Nothing is fetched for a platform the quote merely names: its PCK certificate
    // chain must verify to the pinned Intel SGX Root CA first (the FMSPC and CA are then
    // read from the verified certificate).
    let platform = chain::authentic_platform(&parsed, at)?;
    let (c, stored) = pcs.fetch(platform, at)?;
    Ok((
        c,
        Some(FromPcs {
            platform,
            fetched: true,
            stored,
        }),
    ))
}

/// Collateral from the PCS cache or just fetched from PCS, for the platform (FMSPC and
/// PCK CA) it is cached under.
#[derive(Debug, Clone, Copy)]
struct FromPcs {
    platform: chain::Platform,
    /// Just fetched (not from the cache).
    fetched: bool,
    /// Already in the cache (else cached once a quote verified with it).
    stored: bool,
}

type Fetched = Option<FromPcs>;

/// The dated collateral items: what, issued, next update (Unix seconds).
type Dates = Vec<(&'static str, i64, Option<i64>)>;

/// Checks that every dated collateral item is current at `at`, so an operator learns
/// which one to refresh (dcap-qvl checks the same windows again, and the certificates).
fn check_collateral_dates(c: &QuoteCollateralV3, at: i64) -> Result<(), Error> {
    check_dates(&collateral_dates(c)?, at)
}

/// The issue and next-update dates of the TCB info, the QE identity and both CRLs.
fn collateral_dates(c: &QuoteCollateralV3) -> Result<Dates, Error> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Dated {
        issue_date: String,
        next_update: String,
    }
    let parse_time = |what: &str, s: &str| {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .map(|t| t.unix_timestamp())
            .map_err(|e| {
                refuse(
                    Malformed,
                    format!("TDX collateral {what} has a bad date {s:?}: {e}"),
                )
            })
    };
    let mut items: Dates = Vec::with_capacity(4);
    for (what, json) in [("TCB info", &c.tcb_info), ("QE identity", &c.qe_identity)] {
        let d: Dated = serde_json::from_str(json).map_err(|e| {
            refuse(
                Malformed,
                format!("TDX collateral {what} is malformed: {e}"),
            )
        })?;
        items.push((
            what,
            parse_time(what, &d.issue_date)?,
            Some(parse_time(what, &d.next_update)?),
        ));
    }
    for (what, der) in [("root CA CRL", &c.root_ca_crl), ("PCK CRL", &c.pck_crl)] {
        use x509_parser::prelude::FromDer;
        let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der)
            .map_err(|e| {
                refuse(
                    Malformed,
                    format!("TDX collateral {what} is malformed: {e}"),
                )
            })?;
        items.push((
            what,
            crl.last_update().timestamp(),
            crl.next_update().map(|t| t.timestamp()),
        ));
    }
    Ok(items)
}

/// Refuses unless every item of `dates` is current at `at`.
fn check_dates(dates: &Dates, at: i64) -> Result<(), Error> {
    for &(what, issued, next) in dates {
        if at < issued {
            return Err(refuse(
                Expired,
                format!(
                    "TDX collateral {what} is not yet valid at {} (issued {})",
                    tsm::rfc3339(at),
                    tsm::rfc3339(issued)
                ),
            ));
        }
        if let Some(next) = next.filter(|n| at > *n) {
            return Err(refuse(
                Expired,
                format!(
                    "TDX collateral {what} expired at {} (checked at {}): refresh the collateral",
                    tsm::rfc3339(next),
                    tsm::rfc3339(at)
                ),
            ));
        }
    }
    Ok(())
}

/// A quote that passed every check: dcap-qvl's result and the TD report in it.
struct Verified {
    report: VerifiedReport,
    td: TDReport10,
}

fn refuse(kind: RefusalKind, m: impl Into<String>) -> Error {
    Error::refused(kind, m)
}

/// TD_ATTRIBUTES.DEBUG (bit 0).
fn check_not_debug(td: &TDReport10) -> Result<(), Error> {
    if td.td_attributes[0] & 0x01 != 0 {
        return Err(refuse(PolicyMismatch, format!(
            "the TD is a debug TD (TD_ATTRIBUTES {} has DEBUG set): the host can read and change its memory",
            hex::encode(td.td_attributes)
        )));
    }
    Ok(())
}

/// The TCB status and advisories against the policy.
fn check_tcb(status: &str, advisories: &[String], policy: &Policy) -> Result<(), Error> {
    if !policy.accepted_tcb_status.iter().any(|s| s == status) {
        return Err(refuse(
            PolicyMismatch,
            format!(
                "TCB status {status} is not accepted (accepted_tcb_status = {:?}; advisories: {})",
                policy.accepted_tcb_status,
                if advisories.is_empty() {
                    "none".to_string()
                } else {
                    advisories.join(", ")
                }
            ),
        ));
    }
    if let Some(a) = advisories
        .iter()
        .find(|a| policy.denied_advisories.contains(a))
    {
        return Err(refuse(
            PolicyMismatch,
            format!("the platform is affected by advisory {a}, which denied_advisories refuses"),
        ));
    }
    Ok(())
}

/// The measurement allow-lists.
fn check_measurements(td: &TDReport10, policy: &Policy) -> Result<(), Error> {
    let check = |name: &str, list: &[Vec<u8>], v: &[u8; 48]| {
        if !list.is_empty() && !list.iter().any(|x| x[..] == v[..]) {
            return Err(refuse(
                PolicyMismatch,
                format!("{name} {} is not in the {name} allow-list", hex::encode(v)),
            ));
        }
        Ok(())
    };
    check("MRTD", &policy.mrtd, &td.mr_td)?;
    let rtmrs = [&td.rt_mr0, &td.rt_mr1, &td.rt_mr2, &td.rt_mr3];
    for (i, (r, allowed)) in rtmrs.iter().zip(&policy.rtmr).enumerate() {
        check(&format!("RTMR{i}"), allowed, r)?;
    }
    check("MRCONFIGID", &policy.mrconfigid, &td.mr_config_id)?;
    Ok(())
}

fn node_id(report: &Report, td: &TDReport10, ppid: &[u8]) -> String {
    let mut c = digest::Context::new(&digest::SHA256);
    match report.as_td15_ex() {
        // VMID 0 (an unpartitioned TD, or the L1 VMM) keeps the original digest so that
        // existing node IDs do not change. The L2 VMs of a partitioned TD share its TD_ID,
        // so their VMID must enter too, under its own domain (the longer input cannot
        // equal a VMID 0 input).
        Some(ex) if ex.vmid == 0 => {
            c.update(b"ztid/tdx/node-id/v1/td-id");
            c.update(&ex.td_id);
        }
        Some(ex) => {
            c.update(b"ztid/tdx/node-id/v1/td-id-vmid");
            c.update(&[ex.vmid]);
            c.update(&ex.td_id);
        }
        None => {
            c.update(b"ztid/tdx/node-id/v1/config");
            c.update(&(ppid.len() as u32).to_be_bytes());
            c.update(ppid);
            for f in [
                &td.mr_td,
                &td.rt_mr0,
                &td.rt_mr1,
                &td.rt_mr2,
                &td.mr_config_id,
                &td.mr_owner,
                &td.mr_owner_config,
            ] {
                c.update(f);
            }
        }
    }
    let digest = c.finish();
    #[allow(clippy::indexing_slicing, reason = "a SHA-256 digest is 32 bytes")]
    let half = &digest.as_ref()[..16];
    hex::encode(half)
}

/// Verifies a quote with its collateral at `at` (Unix seconds); `expected_report_data`,
/// when given, must equal all 64 bytes of report_data. Collateral that was just fetched
/// and not cached yet is cached once dcap-qvl accepted the quote with it, and a failure
/// says where the collateral came from; a platform whose quote passed every check is
/// remembered as known (its later TCB info fetches use the known-platform budget).
fn verify_fetched(
    quote: &[u8],
    collateral: &QuoteCollateralV3,
    fetched: Fetched,
    pcs: Option<&Pcs>,
    at: i64,
    expected_report_data: Option<&[u8; 64]>,
    policy: &Policy,
) -> Result<Verified, Error> {
    let (Some(from), Some(pcs)) = (fetched, pcs) else {
        let verified = dcap_verify(quote, collateral, at)?;
        return finish(verified, expected_report_data, policy);
    };
    let (fmspc, ca) = from.platform;
    let verified = if from.fetched {
        dcap_verify(quote, collateral, at).map_err(|e| {
            e.reworded(UntrustedChain, |m| {
                format!(
                    "{m} (with collateral for FMSPC {} fetched from Intel PCS at {})",
                    hex::encode(fmspc),
                    pcs.base
                )
            })
        })?
    } else {
        dcap_verify(quote, collateral, at)?
    };
    if !from.stored {
        pcs.store(&fmspc, ca, collateral);
    }
    let done = finish(verified, expected_report_data, policy)?;
    pcs.remember_verified(from.platform);
    Ok(done)
}

/// The header, the collateral dates, and dcap-qvl's verification of the quote with it.
fn dcap_verify(
    quote: &[u8],
    collateral: &QuoteCollateralV3,
    at: i64,
) -> Result<VerifiedReport, Error> {
    check_header(quote)?;
    check_collateral_dates(collateral, at)?;
    dcap_only(quote, collateral, at)
}

/// dcap-qvl's verification of the quote with its collateral (ring backend).
fn dcap_only(
    quote: &[u8],
    collateral: &QuoteCollateralV3,
    at: i64,
) -> Result<VerifiedReport, Error> {
    let now = u64::try_from(at).unwrap_or(0);
    dcap_qvl::verify::QuoteVerifier::new_prod()
        .with_config::<dcap_qvl::configs::RingConfig>()
        .verify(quote, collateral, now)
        .map_err(|e| {
            refuse(
                UntrustedChain,
                format!("TDX quote verification failed: {e:#}"),
            )
        })
}

/// The checks after dcap-qvl, on its parsed result: TCB status policy, debug,
/// report_data, measurements.
fn finish(
    verified: VerifiedReport,
    expected_report_data: Option<&[u8; 64]>,
    policy: &Policy,
) -> Result<Verified, Error> {
    let td = *verified
        .report
        .as_td10()
        .ok_or_else(|| refuse(Malformed, "the verified quote carries no TD report"))?;
    check_tcb(&verified.status, &verified.advisory_ids, policy)?;
    check_not_debug(&td)?;
    if let Some(expected) = expected_report_data {
        tsm::check_report_data(&td.report_data, expected)?;
    }
    check_measurements(&td, policy)?;
    Ok(Verified {
        report: verified,
        td,
    })
}

/// The claims of a verified quote (`ztid-server evidence verify`).
fn claims(quote: &[u8], v: &Verified) -> serde_json::Value {
    let (verified, td) = (&v.report, &v.td);
    let report = &verified.report;
    let node_id = node_id(report, td, &verified.ppid);
    let body = match report {
        Report::TD10(_) => "TD1.0",
        Report::TD15(_) => "TD1.5",
        Report::TD15Ex(_) => "TD1.5-ex",
        Report::SgxEnclave(_) => "SGX",
    };
    let mut claims = serde_json::json!({
        // The 48-byte header was checked before dcap-qvl verified the quote.
        "quote_version": quote.first_chunk().map(|v| u16::from_le_bytes(*v)),
        "td_report": body,
        "mrtd": hex::encode(td.mr_td),
        "rtmr0": hex::encode(td.rt_mr0),
        "rtmr1": hex::encode(td.rt_mr1),
        "rtmr2": hex::encode(td.rt_mr2),
        "rtmr3": hex::encode(td.rt_mr3),
        "mrconfigid": hex::encode(td.mr_config_id),
        "mrowner": hex::encode(td.mr_owner),
        "mrownerconfig": hex::encode(td.mr_owner_config),
        "mrseam": hex::encode(td.mr_seam),
        "report_data": hex::encode(td.report_data),
        "td_attributes": hex::encode(td.td_attributes),
        "xfam": hex::encode(td.xfam),
        "tcb": {
            "status": verified.status,
            "advisory_ids": verified.advisory_ids,
            "tee_tcb_svn": hex::encode(td.tee_tcb_svn),
            "platform_status": verified.platform_status.status.to_string(),
            "qe_status": verified.qe_status.status.to_string(),
        },
        "tcb_status": verified.status,
        "ppid": hex::encode(&verified.ppid),
        "node_id": node_id,
    });
    if let (Some(ex), Some(obj)) = (report.as_td15_ex(), claims.as_object_mut()) {
        obj.insert("td_id".into(), hex::encode(ex.td_id).into());
    }
    claims
}

struct Inner {
    policy: Policy,
    collateral_dir: Option<PathBuf>,
    pcs: Option<Pcs>,
    cache: CollateralCache,
    listing: Listing,
}

impl Inner {
    /// The offline path (no PCS): the directory's collateral for `quote`, parsed once per
    /// content; its dates checked at `at`; then dcap-qvl and the policy.
    fn verify_from_dir(
        &self,
        dir: &Path,
        quote: &[u8],
        at: i64,
        expected_report_data: &[u8; 64],
    ) -> Result<Verified, Error> {
        let path = collateral_path(dir, quote, self.listing.per_fmspc_files(dir)?);
        let parsed = self.cache.get(&path, &read_bytes(&path)?, at)?;
        check_dates(&parsed.dates, at)?;
        let verified = dcap_only(quote, &parsed.collateral, at)?;
        finish(verified, Some(expected_report_data), &self.policy)
    }
}

/// CA side.
pub struct TdxVerifier {
    inner: Arc<Inner>,
}

impl TdxVerifier {
    /// Builds the verifier from its TOML table (`[attestors.tdx]` in the server config).
    pub fn from_config(config: &toml::Table) -> Result<Self, Error> {
        let cfg = parse_config(config)?;
        if cfg.collateral_dir.is_none() && cfg.pcs.is_none() {
            return Err(cfg_err(
                "collateral_dir is required (--tdx-collateral DIR with collateral.json) unless pcs_fetch = true",
            ));
        }
        if let Some(dir) = &cfg.collateral_dir {
            if !dir.is_dir() {
                return Err(cfg_err(format!(
                    "collateral_dir {} is not a directory",
                    dir.display()
                )));
            }
        }
        let pcs = cfg.pcs.as_ref().map(Pcs::new);
        if let Some(p) = &pcs {
            p.create_cache()?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                policy: cfg.policy,
                collateral_dir: cfg.collateral_dir,
                pcs,
                cache: CollateralCache::default(),
                listing: Listing::default(),
            }),
        })
    }

    /// Verifies one answer against the expected report_data at `now` (the checks of a
    /// session's `resume`, without the challenge bookkeeping).
    pub fn verify_evidence(
        &self,
        quote: &[u8],
        expected_report_data: &[u8; 64],
        now: SystemTime,
    ) -> Result<AttestedNode, Error> {
        check_header(quote)?;
        let at = ztid_attestation::unix_seconds(now);
        let v = match (&self.inner.collateral_dir, &self.inner.pcs) {
            (Some(dir), None) => {
                self.inner
                    .verify_from_dir(dir, quote, at, expected_report_data)?
            }
            _ => {
                let (collateral, fetched) = collateral_for(
                    self.inner.collateral_dir.as_deref(),
                    self.inner.pcs.as_ref(),
                    quote,
                    at,
                )?;
                verify_fetched(
                    quote,
                    &collateral,
                    fetched,
                    self.inner.pcs.as_ref(),
                    at,
                    Some(expected_report_data),
                    &self.inner.policy,
                )?
            }
        };
        let node_id = node_id(&v.report.report, &v.td, &v.report.ppid);
        let mut selectors = vec![Selector::new(
            METHOD,
            &format!("mrtd:{}", hex::encode(v.td.mr_td)),
        )?];
        for (i, r) in [&v.td.rt_mr0, &v.td.rt_mr1, &v.td.rt_mr2, &v.td.rt_mr3]
            .iter()
            .enumerate()
        {
            selectors.push(Selector::new(
                METHOD,
                &format!("rtmr{i}:{}", hex::encode(r)),
            )?);
        }
        selectors.push(Selector::new(
            METHOD,
            &format!("mrconfigid:{}", hex::encode(v.td.mr_config_id)),
        )?);
        let digest_out = sha256(quote);
        Ok(AttestedNode {
            method: METHOD,
            node_id,
            selectors,
            aliases: Vec::new(),
            evidence_digest: digest_out,
        })
    }
}

impl NodeVerifier for TdxVerifier {
    fn method(&self) -> &'static str {
        METHOD
    }

    fn start(&self, evidence: &[u8], ctx: &AttestationContext<'_>) -> Result<VerifierStep, Error> {
        if !evidence.is_empty() {
            return Err(Error::Protocol(
                "tdx attestation starts with empty evidence; the quote answers the CA's challenge"
                    .into(),
            ));
        }
        let (pending, challenge) = Pending::issue(ctx)?;
        Ok(VerifierStep::Challenge(
            challenge,
            Box::new(TdxSession {
                verifier: TdxVerifier {
                    inner: self.inner.clone(),
                },
                pending,
            }),
        ))
    }
}

struct TdxSession {
    verifier: TdxVerifier,
    pending: Pending,
}

impl VerificationSession for TdxSession {
    fn resume(
        self: Box<Self>,
        answer: &[u8],
        ctx: &AttestationContext<'_>,
    ) -> Result<VerifierStep, Error> {
        let expected = self.pending.expected_report_data(ctx)?;
        self.verifier
            .verify_evidence(answer, &expected, ctx.now)
            .map(VerifierStep::Attested)
    }
}

/// Verifies captured evidence offline (`ztid-server evidence verify`): the claims as JSON,
/// or the first failed check. `evidence` is a quote (binary or hex); the collateral comes
/// from `collateral` (or the config's `collateral_dir`), and from the PCS cache or Intel
/// PCS when the config sets `pcs_fetch = true`; `report_data`, when given, must equal
/// report_data (shorter values are zero-padded).
pub fn verify_offline(
    evidence: &[u8],
    collateral: Option<&Path>,
    report_data: Option<&[u8]>,
    at: SystemTime,
    config: &toml::Table,
) -> Result<serde_json::Value, Error> {
    let cfg = parse_config(config)?;
    let quote = tsm::maybe_hex(evidence);
    let dir = collateral.map(Path::to_path_buf).or(cfg.collateral_dir);
    let pcs = cfg.pcs.as_ref().map(Pcs::new);
    check_header(&quote)?;
    let at = ztid_attestation::unix_seconds(at);
    let (c, fetched) = collateral_for(dir.as_deref(), pcs.as_ref(), &quote, at)?;
    let expected = report_data.map(tsm::pad_report_data).transpose()?;
    verify_fetched(
        &quote,
        &c,
        fetched,
        pcs.as_ref(),
        at,
        expected.as_ref(),
        &cfg.policy,
    )
    .map(|v| claims(&quote, &v))
}

#[cfg(test)]
mod tests;
