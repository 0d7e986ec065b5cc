//! `sev-snp` node attestation: an AMD SEV-SNP confidential VM proves its launch
//! measurement, policy and platform TCB with a hardware-signed attestation report.
//!
//! # Protocol
//!
//! The agent's initial evidence is empty. The CA answers with a challenge (a 32-byte
//! nonce and the agent's CSR key, see [`super::tsm`]); the agent asks the PSP, through
//! configfs-tsm, for a report whose report_data is `SHA-512(nonce ‖ SPKI)` and sends the
//! report followed by the host's certificate table (`auxblob`, when the host provides
//! one). The CA checks, in this order:
//!
//! 1. the report: 1184 bytes, version 2, 3 or 5 (Milan, Genoa, Turin), ECDSA P-384;
//! 2. the VEK (VCEK, or VLEK per KEY_INFO) from the certificate table or the collateral
//!    directory: VCEK → ASK → ARK or VLEK → ASVK → ARK, AMD's ARKs pinned (compiled in,
//!    from AMD's KDS), each certificate valid at the verification time;
//! 3. the report signature over the raw signed bytes (0x000..0x2A0);
//! 4. the CPUID family/model (v3+) names the VEK's product;
//! 5. reported_tcb equals the VEK's TCB extensions (bootloader, TEE, SNP, microcode,
//!    and FMC on Turin, whose byte layout differs);
//! 6. chip_id equals the VCEK hwID (64 bytes; 8 on Turin; VLEK reports carry none);
//! 7. every AMD CRL in the collateral is signed by a pinned ARK and current, and the
//!    chain's signing key is not on it;
//! 8. all 64 bytes of report_data equal the expected binding;
//! 9. the policy below.
//!
//! Time is always a parameter (`AttestationContext::now`, or `--at` for
//! `ztid-server evidence verify`).
//!
//! Certificates are parsed once per exact DER (bounded cache), and a signature that
//! verified is remembered per exact (issuer, certificate or CRL) pair: a chip's VCEK, one
//! per chip ID and reported TCB, costs its RSA-4096 check once per process, and the
//! built-in ARK/ASK/ASVK signatures are checked the first time a chain goes through
//! them. Dates, CRL contents and every check on the report run at every call.
//!
//! # Configuration (`[attestors.sev_snp]`)
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `collateral_dir` | offline VCEK/VLEK/ASK certificates and AMD CRLs (PEM or DER files; `--sev-snp-collateral`) | none: the agent's certificate table only |
//! | `allowed_vmpl` | VMPLs a report may come from | `[0]` |
//! | `measurements` | allow-list of launch measurements (96 hex digits) | any |
//! | `host_data` | allow-list of HOST_DATA values (64 hex digits) | any |
//! | `min_tcb.<product>` | table with `bootloader`, `tee`, `snp`, `microcode`, `fmc` minimums for `milan`, `genoa`, `turin`... | none |
//! | `min_guest_svn` | minimum guest SVN | 0 |
//! | `products` | allowed products (`milan`, `genoa`, `turin`) | any |
//! | `test_roots_dir` | **test only**: extra ARK (and ASK/ASVK) certificates trusted besides AMD's, for synthetic evidence; never set it in production | none |
//! | `kds_fetch` | fetch what the certificate table and `collateral_dir` lack (VCEK, cert_chain, CRL) from AMD KDS, and cache it | `false` |
//! | `kds_url` | KDS base URL (`https://`; `http://` only because it is explicit) | `https://kdsintf.amd.com` |
//! | `kds_cache_dir` | where fetched collateral is kept (created 0700); required with `kds_fetch` | none |
//! | `kds_crl` | with `kds_fetch`: also fetch the AMD CRL (or take it from the cache while current) when `collateral_dir` has none from the chain's ARK; a CRL in the node's certificate table is applied besides but never replaces it (a node could send an older genuine CRL that predates a revocation) | `true` |
//!
//! A guest whose policy allows debugging (bit 19) is always refused: its host can read
//! and change its memory.
//!
//! # Fetching from AMD KDS
//!
//! Off by default: with `kds_fetch` unset or `false` nothing is ever fetched, and a
//! missing VCEK is refused as before. With `kds_fetch = true`, a verification whose
//! VCEK (for the report's chip_id and reported TCB), signing key or CRL is in neither
//! the certificate table nor `collateral_dir` takes it from `kds_cache_dir`, or else
//! from KDS (10 s timeout, 1 MiB cap), checks it exactly like offline collateral and
//! only then caches it; cached files are used without a request while they are valid at
//! the verification time. A VLEK cannot be fetched (KDS issues it only to the cloud
//! provider, with AMD credentials). URL shapes and the cache layout: see `kds.rs`. For a
//! version 2 report (no CPUID), the product tried is the configured `products`, else
//! Milan, then Genoa.
//!
//! The VCEK URL comes from the report's chip_id and TCB before the report is
//! authenticated, so a flood of reports naming bogus chips must not starve genuine
//! nodes: such VCEK fetches spend only an open budget, while the VCEKs of chips that
//! already passed a full verification here (bounded per chip) and AMD's fixed
//! cert_chain and CRL URLs have budgets of their own, and KDS's "not found" answers are
//! remembered for an hour. Details and bounds: `kds.rs` and [`crate::fetch`].
//!
//! # Node ID and selectors
//!
//! The node ID is the hex of the first 16 bytes of `SHA-256("ztid/sev-snp/node-id/v1" ‖
//! chip_id ‖ report_id)`. REPORT_ID is a random value the PSP assigns when it launches
//! the guest, so the ID is the same for every attestation of one VM launch (an agent
//! restart keeps its identity) and differs for every new launch, even of the same image
//! on the same chip; chip_id keeps IDs of different chips apart (it is zero for VLEK
//! reports, where report_id alone decides). Selectors come from verified fields only:
//! `sev-snp:measurement:<hex>`, `sev-snp:policy:<hex>` (the 64-bit policy, lowercase hex
//! without leading zeros), `sev-snp:host-data:<hex>` and, for VCEK reports,
//! `sev-snp:chip-id:<hex>` (the hwID: 64 bytes, 8 on Turin). A report made through an
//! SVSM vTPM service (VMPL 0) adds `sev-snp:vtpm-ek-hash:<hex>` only when `measurements`
//! is set: the launch measurement is what shows an SVSM made it (see `vtpm_selector`).

mod certs;
mod collateral;
mod kds;
mod report;
mod verify;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use ring::digest;

pub use ztid_attestation::sev_snp::*;
use ztid_attestation::Error;
use ztid_attestation::RefusalKind::{Malformed, PolicyMismatch};
use ztid_spiffe::Selector;

use crate::tsm::{self, Pending};
use crate::{AttestationContext, AttestedNode, NodeVerifier, VerificationSession, VerifierStep};

pub use collateral::encode_cert_table;

use certs::{AmdCert, TrustStore};
use collateral::Collateral;
use kds::{Kds, KdsConfig};
use verify::{MinTcb, Policy};

const KEYS: &[&str] = &[
    "collateral_dir",
    "allowed_vmpl",
    "measurements",
    "host_data",
    "min_tcb",
    "min_guest_svn",
    "products",
    "test_roots_dir",
    "kds_fetch",
    "kds_url",
    "kds_cache_dir",
    "kds_crl",
];

/// Parsed `[attestors.sev_snp]`.
struct Config {
    policy: Policy,
    collateral_dir: Option<PathBuf>,
    test_roots_dir: Option<PathBuf>,
    kds: Option<KdsConfig>,
}

fn cfg_err(m: impl std::fmt::Display) -> Error {
    Error::Config(format!("[attestors.sev_snp]: {m}"))
}

fn hex_list(t: &toml::Table, key: &str, len: usize) -> Result<Vec<Vec<u8>>, Error> {
    let Some(v) = t.get(key) else {
        return Ok(Vec::new());
    };
    let arr = v
        .as_array()
        .ok_or_else(|| cfg_err(format!("{key} must be an array of hex strings")))?;
    arr.iter()
        .map(|x| {
            let s = x
                .as_str()
                .ok_or_else(|| cfg_err(format!("{key} must be an array of hex strings")))?;
            let b = hex::decode(s.trim())
                .map_err(|e| cfg_err(format!("{key}: {s:?} is not hex: {e}")))?;
            if b.len() != len {
                return Err(cfg_err(format!(
                    "{key}: {s:?} is {} bytes, must be {len}",
                    b.len()
                )));
            }
            Ok(b)
        })
        .collect()
}

fn u32_of(v: &toml::Value, what: &str, max: u32) -> Result<u32, Error> {
    v.as_integer()
        .and_then(|i| u32::try_from(i).ok())
        .filter(|i| *i <= max)
        .ok_or_else(|| cfg_err(format!("{what} must be an integer from 0 to {max}")))
}

fn parse_config(t: &toml::Table) -> Result<Config, Error> {
    if let Some(k) = t.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(cfg_err(format!(
            "unknown key {k:?} (known: {})",
            KEYS.join(", ")
        )));
    }
    let path = |key: &str| -> Result<Option<PathBuf>, Error> {
        t.get(key)
            .map(|v| {
                v.as_str()
                    .map(PathBuf::from)
                    .ok_or_else(|| cfg_err(format!("{key} must be a path")))
            })
            .transpose()
    };
    let mut policy = Policy::default();
    if let Some(v) = t.get("allowed_vmpl") {
        let arr = v
            .as_array()
            .ok_or_else(|| cfg_err("allowed_vmpl must be an array of integers"))?;
        policy.allowed_vmpl = arr
            .iter()
            .map(|x| u32_of(x, "allowed_vmpl entries", 3))
            .collect::<Result<_, _>>()?;
    }
    policy.measurements = hex_list(t, "measurements", 48)?;
    policy.host_data = hex_list(t, "host_data", 32)?;
    if let Some(v) = t.get("min_guest_svn") {
        policy.min_guest_svn = u32_of(v, "min_guest_svn", u32::MAX)?;
    }
    if let Some(v) = t.get("products") {
        policy.products = v
            .as_array()
            .ok_or_else(|| cfg_err("products must be an array of strings"))?
            .iter()
            .map(|p| {
                p.as_str()
                    .map(|s| s.to_ascii_lowercase())
                    .ok_or_else(|| cfg_err("products must be an array of strings"))
            })
            .collect::<Result<_, _>>()?;
    }
    if let Some(v) = t.get("min_tcb") {
        let tbl = v
            .as_table()
            .ok_or_else(|| cfg_err("min_tcb must be a table of products"))?;
        let mut out = BTreeMap::new();
        for (product, m) in tbl {
            let m = m
                .as_table()
                .ok_or_else(|| cfg_err(format!("min_tcb.{product} must be a table")))?;
            let mut min = MinTcb::default();
            for (k, v) in m {
                let x = u32_of(v, &format!("min_tcb.{product}.{k}"), 255)? as u8;
                match k.as_str() {
                    "bootloader" => min.bootloader = x,
                    "tee" => min.tee = x,
                    "snp" => min.snp = x,
                    "microcode" => min.microcode = x,
                    "fmc" => min.fmc = x,
                    _ => {
                        return Err(cfg_err(format!(
                            "min_tcb.{product}: unknown component {k:?} (bootloader, tee, snp, microcode, fmc)"
                        )))
                    }
                }
            }
            out.insert(product.to_ascii_lowercase(), min);
        }
        policy.min_tcb = out;
    }
    Ok(Config {
        policy,
        collateral_dir: path("collateral_dir")?,
        test_roots_dir: path("test_roots_dir")?,
        kds: kds_config(t, path("kds_cache_dir")?)?,
    })
}

/// The `kds_*` keys: `None` unless `kds_fetch = true`.
fn kds_config(t: &toml::Table, cache_dir: Option<PathBuf>) -> Result<Option<KdsConfig>, Error> {
    let flag = |key: &str| -> Result<Option<bool>, Error> {
        t.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| cfg_err(format!("{key} must be true or false")))
            })
            .transpose()
    };
    let crl = flag("kds_crl")?;
    let url = t
        .get("kds_url")
        .map(|v| {
            v.as_str()
                .ok_or_else(|| cfg_err("kds_url must be a string"))
                .and_then(|u| super::fetch::base_url("kds_url", u).map_err(cfg_err))
        })
        .transpose()?;
    match flag("kds_fetch")? {
        None => {
            if let Some(k) = ["kds_url", "kds_cache_dir", "kds_crl"]
                .into_iter()
                .find(|k| t.contains_key(*k))
            {
                return Err(cfg_err(format!(
                    "{k} is set but kds_fetch is not: set kds_fetch = true to fetch from AMD KDS (off by default)"
                )));
            }
            Ok(None)
        }
        Some(false) => Ok(None),
        Some(true) => Ok(Some(KdsConfig {
            base_url: url.unwrap_or_else(|| kds::DEFAULT_KDS_URL.to_string()),
            cache_dir: cache_dir.ok_or_else(|| {
                cfg_err("kds_fetch = true needs kds_cache_dir (where fetched collateral is kept)")
            })?,
            crl: crl.unwrap_or(true),
        })),
    }
}

enum Store {
    Builtin(&'static TrustStore),
    Owned(TrustStore),
}

impl Store {
    fn load(test_roots: Option<&Path>) -> Result<Self, Error> {
        Ok(match test_roots {
            None => Store::Builtin(TrustStore::builtin()?),
            Some(dir) => {
                tracing::warn!(
                    dir = %dir.display(),
                    "sev-snp: trusting TEST roots from test_roots_dir besides AMD's; never do this in production"
                );
                Store::Owned(TrustStore::with_test_roots(dir)?)
            }
        })
    }

    fn get(&self) -> &TrustStore {
        match self {
            Store::Builtin(s) => s,
            Store::Owned(s) => s,
        }
    }
}

struct Inner {
    store: Store,
    policy: Policy,
    collateral_dir: Option<PathBuf>,
    kds: Option<Kds>,
}

impl Inner {
    fn collateral(&self, dir: Option<&Path>, table: Option<&[u8]>) -> Result<Collateral, Error> {
        let mut c = Collateral::default();
        if let Some(t) = table {
            c.extend(collateral::parse_cert_table(t)?);
        }
        if let Some(d) = dir.or(self.collateral_dir.as_deref()) {
            c.extend(collateral::load_dir(d)?);
        }
        Ok(c)
    }

    /// The collateral for `report` at `at`: the table's and the directory's, completed
    /// from the KDS cache or KDS when fetching is on.
    fn collateral_for(
        &self,
        dir: Option<&Path>,
        report: &[u8],
        table: Option<&[u8]>,
        at: i64,
    ) -> Result<Collateral, Error> {
        let mut c = self.collateral(dir, table)?;
        if let Some(k) = &self.kds {
            k.complete(self.store.get(), &mut c, report, at, &self.policy.products)?;
        }
        Ok(c)
    }
}

/// The node id a vTPM manifest (the vTPM EK's `TPMT_PUBLIC`) names: hex SHA-256 of the
/// EK's SubjectPublicKeyInfo, as the `tpm` method computes it.
fn vtpm_ek_hash(manifest: &[u8]) -> Result<String, Error> {
    ztid_attestation::tpm::ek_hash(manifest).map_err(|e| {
        Error::refused(
            e.refusal_kind().unwrap_or(Malformed),
            format!("the SVSM vTPM manifest is not an EK TPMT_PUBLIC: {e}"),
        )
    })
}

/// The `sev-snp:vtpm-ek-hash` selector for the SVSM vTPM manifest of a verified report
/// made at `vmpl`, or `None` when the policy cannot tell the report came from an SVSM.
///
/// Only the SVSM (VMPL 0) speaks for the vTPM: a guest kernel above it could put any
/// manifest in its own report, so another VMPL is refused. And a guest *without* an SVSM
/// runs its kernel at VMPL 0 and could name any EK: only the launch measurement tells the
/// operator's SVSM firmware apart, so without a `measurements` allow-list the manifest
/// proves nothing and no selector is emitted (the node still attests with the other
/// selectors; `bind_vtpm` and `uncertified_ek` then refuse for lack of a binding, and the
/// server refuses to start with them but no allow-list).
fn vtpm_selector(manifest: &[u8], vmpl: u32, policy: &Policy) -> Result<Option<Selector>, Error> {
    if vmpl != 0 {
        return Err(Error::refused(PolicyMismatch, format!(
            "a report carrying an SVSM vTPM manifest must be made at VMPL 0 (by the SVSM), not VMPL {vmpl}"
        )));
    }
    // Parsed either way, so a malformed manifest is refused as before.
    let ek_hash = vtpm_ek_hash(manifest)?;
    if policy.measurements.is_empty() {
        tracing::warn!(
            ek_hash = %ek_hash,
            "sev-snp: the report carries an SVSM vTPM manifest, but [attestors.sev_snp] measurements is empty, \
             so nothing shows the report came from an SVSM: no sev-snp:vtpm-ek-hash selector"
        );
        return Ok(None);
    }
    Ok(Some(Selector::new(
        METHOD,
        &format!("vtpm-ek-hash:{ek_hash}"),
    )?))
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let mut o = [0u8; 32];
    o.copy_from_slice(digest::digest(&digest::SHA256, b).as_ref());
    o
}

/// CA side.
pub struct SnpVerifier {
    inner: Arc<Inner>,
}

impl SnpVerifier {
    /// Builds the verifier from its TOML table (`[attestors.sev_snp]` in the server config).
    pub fn from_config(config: &toml::Table) -> Result<Self, Error> {
        let cfg = parse_config(config)?;
        if let Some(d) = &cfg.collateral_dir {
            if !d.is_dir() {
                return Err(cfg_err(format!(
                    "collateral_dir {} is not a directory",
                    d.display()
                )));
            }
        }
        let kds = cfg.kds.as_ref().map(Kds::new);
        if let Some(k) = &kds {
            k.create_cache()?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                store: Store::load(cfg.test_roots_dir.as_deref())?,
                policy: cfg.policy,
                collateral_dir: cfg.collateral_dir,
                kds,
            }),
        })
    }

    /// Verifies one answer against the expected report_data at `now` (the checks of a
    /// session's `resume`, without the challenge bookkeeping).
    pub fn verify_evidence(
        &self,
        evidence: &[u8],
        expected_report_data: &[u8; 64],
        now: SystemTime,
    ) -> Result<AttestedNode, Error> {
        let Evidence {
            manifest,
            report,
            table,
        } = split_evidence(evidence)?;
        let at = ztid_attestation::unix_seconds(now);
        let collateral = self.inner.collateral_for(None, report, table, at)?;
        // Through an SVSM service the report binds the manifest too.
        let expected = match manifest {
            Some(m) => svsm_report_data(expected_report_data, m),
            None => *expected_report_data,
        };
        let v = verify::verify(
            self.inner.store.get(),
            report,
            &collateral,
            at,
            Some(&expected),
            &self.inner.policy,
            false,
        )?;
        let mut selectors = vec![
            Selector::new(
                METHOD,
                &format!("measurement:{}", hex::encode(v.measurement)),
            )?,
            Selector::new(METHOD, &format!("policy:{:x}", v.policy))?,
            Selector::new(METHOD, &format!("host-data:{}", hex::encode(v.host_data)))?,
        ];
        if let Some(c) = &v.chip_id {
            selectors.push(Selector::new(
                METHOD,
                &format!("chip-id:{}", hex::encode(c)),
            )?);
        }
        if let Some(m) = manifest {
            selectors.extend(vtpm_selector(m, v.vmpl, &self.inner.policy)?);
        }
        // Every check passed: this chip's later VCEK fetches (a new TCB) draw on the
        // known-chip budget, out of reach of floods of bogus chip IDs.
        if let (Some(k), Some(hwid)) = (&self.inner.kds, &v.chip_id) {
            k.remember_verified_chip(hwid);
        }
        Ok(AttestedNode {
            method: METHOD,
            node_id: v.node_id,
            selectors,
            aliases: Vec::new(),
            evidence_digest: sha256(evidence),
        })
    }
}

impl NodeVerifier for SnpVerifier {
    fn method(&self) -> &'static str {
        METHOD
    }

    fn start(&self, evidence: &[u8], ctx: &AttestationContext<'_>) -> Result<VerifierStep, Error> {
        if !evidence.is_empty() {
            return Err(Error::Protocol(
                "sev-snp attestation starts with empty evidence; the report answers the CA's challenge".into(),
            ));
        }
        let (pending, challenge) = Pending::issue(ctx)?;
        Ok(VerifierStep::Challenge(
            challenge,
            Box::new(SnpSession {
                verifier: SnpVerifier {
                    inner: self.inner.clone(),
                },
                pending,
            }),
        ))
    }
}

/// One issued challenge; consumed by the answer.
struct SnpSession {
    verifier: SnpVerifier,
    pending: Pending,
}

impl VerificationSession for SnpSession {
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

/// A certificate given as evidence, if it is one.
fn as_certificate(e: &[u8]) -> Option<Result<AmdCert, Error>> {
    if e.starts_with(b"-----BEGIN CERTIFICATE") {
        return Some(
            pem::parse(e)
                .map_err(|x| Error::refused(Malformed, format!("bad PEM certificate: {x}")))
                .and_then(|p| {
                    AmdCert::from_der(p.contents())
                        .map_err(|x| Error::refused(Malformed, format!("bad certificate: {x}")))
                }),
        );
    }
    if e.len() != REPORT_LEN && e.first() == Some(&0x30) {
        if let Ok(c) = AmdCert::from_der(e) {
            return Some(Ok(c));
        }
    }
    None
}

/// Verifies captured evidence offline (`ztid-server evidence verify`): the claims as JSON,
/// or the first failed check.
///
/// `evidence` is a report (binary or hex), optionally followed by the host's certificate
/// table; or a VCEK/VLEK certificate alone, whose chain is then checked. Certificates and
/// CRLs come from the table and from `collateral` (or the config's `collateral_dir`), and
/// from the KDS cache or AMD KDS when the config sets `kds_fetch = true`.
/// `report_data`, when given, must equal report_data (shorter values are zero-padded).
pub fn verify_offline(
    evidence: &[u8],
    collateral: Option<&Path>,
    report_data: Option<&[u8]>,
    at: SystemTime,
    config: &toml::Table,
) -> Result<serde_json::Value, Error> {
    let cfg = parse_config(config)?;
    let store = Store::load(cfg.test_roots_dir.as_deref())?;
    let inner = Inner {
        store,
        policy: cfg.policy,
        collateral_dir: cfg.collateral_dir,
        kds: cfg.kds.as_ref().map(Kds::new),
    };
    let evidence = tsm::maybe_hex(evidence);
    let at = ztid_attestation::unix_seconds(at);
    if let Some(cert) = as_certificate(&evidence) {
        if report_data.is_some() {
            return Err(Error::Config(
                "--report-data applies to reports, not to a certificate".into(),
            ));
        }
        let c = inner.collateral(collateral, None)?;
        return verify::verify_vek_only(inner.store.get(), &cert?, &c, at);
    }
    let Evidence {
        manifest,
        report,
        table,
    } = split_evidence(&evidence)?;
    let c = inner.collateral_for(collateral, report, table, at)?;
    let expected = report_data
        .map(tsm::pad_report_data)
        .transpose()?
        .map(|rd| match manifest {
            Some(m) => svsm_report_data(&rd, m),
            None => rd,
        });
    verify::verify(
        inner.store.get(),
        report,
        &c,
        at,
        expected.as_ref(),
        &inner.policy,
        true,
    )
    .map(|v| v.claims)
}

/// Checks a VCEK or VLEK certificate (PEM or DER) up to a pinned AMD ARK at `at`:
/// through `signing_key` (an ASK or ASVK, PEM or DER) when given, otherwise through the
/// pinned signing key its issuer names. Returns what the certificate certifies.
pub fn verify_vek_chain(
    vek: &[u8],
    signing_key: Option<&[u8]>,
    at: SystemTime,
) -> Result<serde_json::Value, Error> {
    let parse = |b: &[u8]| -> Result<AmdCert, Error> {
        let der = if b.starts_with(b"-----BEGIN") {
            pem::parse(b)
                .map_err(|e| Error::refused(Malformed, format!("bad PEM: {e}")))?
                .into_contents()
        } else {
            b.to_vec()
        };
        AmdCert::from_der(&der)
            .map_err(|e| Error::refused(Malformed, format!("bad certificate: {e}")))
    };
    let store = TrustStore::builtin()?;
    let vek = parse(vek)?;
    let at = ztid_attestation::unix_seconds(at);
    match signing_key {
        None => verify::verify_vek_only(store, &vek, &Collateral::default(), at),
        Some(sk) => {
            let sk = parse(sk)?;
            let chain = store.check_vek_under(&vek, &sk, None, at)?;
            Ok(serde_json::json!({
                "product": chain.product,
                "signing_key": vek.role.label(),
                "vek_issuer": vek.issuer_cn,
                "trust_anchor": chain.anchor.ark.subject_cn,
            }))
        }
    }
}

#[cfg(test)]
mod tests;
