//! Unit tests over the real vectors in `../shared/vectors/tdx` (override with `ZTID_VECTORS`).

use super::*;
use ztid_attestation::RefusalKind::{CollateralUnavailable, Replay, Unsupported};

fn vectors() -> PathBuf {
    let p = std::env::var_os("ZTID_VECTORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/vectors"));
    assert!(
        p.join("tdx").is_dir(),
        "TDX test vectors not found at {} (set ZTID_VECTORS to the shared vectors directory)",
        p.display()
    );
    p.join("tdx")
}

fn quote(dir: &str) -> Vec<u8> {
    let p = vectors().join(dir).join("quote.bin");
    std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn td_of(q: &[u8]) -> TDReport10 {
    *Quote::parse(q).unwrap().report.as_td10().unwrap()
}

/// The detail of a refusal of `kind`.
fn refusal<T>(kind: RefusalKind, r: Result<T, Error>) -> String {
    match r {
        Err(Error::Refused(m)) => {
            assert_eq!(m.kind, kind, "{}", m.detail);
            m.detail
        }
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal"),
    }
}

#[test]
fn debug_td_is_refused() {
    // Setting DEBUG breaks the quote signature, so the check runs on a parsed report.
    let mut td = td_of(&quote("v4-uptodate"));
    check_not_debug(&td).unwrap();
    td.td_attributes[0] |= 1;
    let m = refusal(PolicyMismatch, check_not_debug(&td));
    assert!(
        m.starts_with("the TD is a debug TD (TD_ATTRIBUTES 0100001000000000 has DEBUG set)"),
        "{m}"
    );
}

#[test]
fn tcb_status_policy() {
    let p = Policy::default();
    check_tcb("UpToDate", &[], &p).unwrap();
    let m = refusal(
        PolicyMismatch,
        check_tcb("OutOfDate", &["INTEL-SA-00615".into()], &p),
    );
    assert_eq!(
        m,
        "TCB status OutOfDate is not accepted (accepted_tcb_status = [\"UpToDate\"]; advisories: INTEL-SA-00615)"
    );
    let p = Policy {
        accepted_tcb_status: vec!["UpToDate".into(), "OutOfDate".into()],
        denied_advisories: vec!["INTEL-SA-00615".into()],
        ..Policy::default()
    };
    check_tcb("OutOfDate", &["INTEL-SA-00334".into()], &p).unwrap();
    let m = refusal(
        PolicyMismatch,
        check_tcb("OutOfDate", &["INTEL-SA-00615".into()], &p),
    );
    assert_eq!(
        m,
        "the platform is affected by advisory INTEL-SA-00615, which denied_advisories refuses"
    );
}

#[test]
fn measurement_allow_lists() {
    let td = td_of(&quote("v4-uptodate"));
    check_measurements(&td, &Policy::default()).unwrap();
    let mut p = Policy {
        mrtd: vec![td.mr_td.to_vec()],
        ..Policy::default()
    };
    p.rtmr[3] = vec![vec![0; 48]];
    check_measurements(&td, &p).unwrap();
    p.rtmr[2] = vec![vec![1; 48]];
    let m = refusal(PolicyMismatch, check_measurements(&td, &p));
    assert!(m.starts_with("RTMR2 d833feef"), "{m}");
    let p = Policy {
        mrconfigid: vec![vec![1; 48]],
        ..Policy::default()
    };
    let m = refusal(PolicyMismatch, check_measurements(&td, &p));
    assert!(m.contains("is not in the MRCONFIGID allow-list"), "{m}");
}

#[test]
fn header_checks() {
    let m = refusal(Unsupported, check_header(&quote("sgx-v3-negative")));
    assert_eq!(
        m,
        "the quote is an SGX enclave quote (version 3, TEE type 0), not a TDX quote"
    );
    let mut q = quote("v4-uptodate");
    q[0] = 3;
    let m = refusal(Unsupported, check_header(&q));
    assert_eq!(m, "TDX quote version 3 is not supported (4 and 5 are)");
    assert!(refusal(Malformed, check_header(&q[..10])).contains("shorter than its 48-byte header"));
}

#[test]
fn config_keys() {
    let t: toml::Table = toml::from_str(
        r#"
        collateral_dir = "/x"
        accepted_tcb_status = ["UpToDate", "SWHardeningNeeded"]
        denied_advisories = ["INTEL-SA-00615"]
        rtmr3 = ["556d4986cae57e7e3756b6471e4951be6f5f1b4e70942c72325223d6af239da90f1484eeb627727e6d2c0755393b5fdf"]
        "#,
    )
    .unwrap();
    let c = parse_config(&t).unwrap();
    assert_eq!(c.policy.accepted_tcb_status.len(), 2);
    assert_eq!(c.policy.rtmr[3].len(), 1);
    for bad in [
        "accepted_tcb_status = [\"Revoked\"]",
        "mrtd = [\"00\"]",
        "rtmr4 = []",
    ] {
        let t: toml::Table = toml::from_str(bad).unwrap();
        assert!(matches!(parse_config(&t), Err(Error::Config(_))), "{bad}");
    }
    assert!(matches!(
        TdxVerifier::from_config(&toml::Table::new()),
        Err(Error::Config(_))
    ));
}

#[test]
fn node_ids_per_report_kind() {
    let q4 = quote("v4-uptodate");
    let r4 = Quote::parse(&q4).unwrap().report;
    let id4 = node_id(&r4, r4.as_td10().unwrap(), b"ppid");
    assert_eq!(id4.len(), 32);
    assert_ne!(id4, node_id(&r4, r4.as_td10().unwrap(), b"other platform"));
    let qx = quote("v5-td15ex-uptodate");
    let rx = Quote::parse(&qx).unwrap().report;
    assert!(rx.as_td15_ex().is_some());
    // TD_ID decides for a TD 1.5-ex report: the platform does not enter.
    assert_eq!(
        node_id(&rx, rx.as_td10().unwrap(), b"a"),
        node_id(&rx, rx.as_td10().unwrap(), b"b")
    );
}

/// The L2 VMs of a partitioned TD share its TD_ID: VMID must tell their node IDs apart,
/// while VMID 0 keeps the ID it always had.
#[test]
fn td15ex_node_id_includes_vmid() {
    let qx = quote("v5-td15ex-uptodate");
    let rx = Quote::parse(&qx).unwrap().report;
    let ex = *rx.as_td15_ex().unwrap();
    let with_vmid = |vmid: u8| {
        let mut r = rx.clone();
        if let Report::TD15Ex(e) = &mut r {
            e.vmid = vmid;
        }
        node_id(&r, r.as_td10().unwrap(), b"ppid")
    };
    // VMID 0: the original digest over TD_ID alone.
    let mut old = digest::Context::new(&digest::SHA256);
    old.update(b"ztid/tdx/node-id/v1/td-id");
    old.update(&ex.td_id);
    assert_eq!(with_vmid(0), hex::encode(&old.finish().as_ref()[..16]));
    let ids: Vec<String> = (0..=3).map(with_vmid).collect();
    for (i, a) in ids.iter().enumerate() {
        assert_eq!(a.len(), 32);
        for b in &ids[i + 1..] {
            assert_ne!(a, b, "reports differing only in VMID share a node ID");
        }
    }
}

/// A verifier over a copy of `dir`'s collateral in a temporary directory.
fn verifier_over_copy(dir: &str) -> (TdxVerifier, tempfile::TempDir, Vec<u8>) {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(vectors().join(dir).join("collateral.json")).unwrap();
    std::fs::write(tmp.path().join("collateral.json"), &bytes).unwrap();
    let mut cfg = toml::Table::new();
    cfg.insert(
        "collateral_dir".into(),
        tmp.path().display().to_string().into(),
    );
    (TdxVerifier::from_config(&cfg).unwrap(), tmp, bytes)
}

fn unix(secs: u64) -> SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)
}

#[test]
fn cached_collateral_still_refuses_tampering_and_expiry() {
    let (v, tmp, good) = verifier_over_copy("v4-uptodate");
    let q = quote("v4-uptodate");
    let rd = td_of(&q).report_data;
    // 2025-07-01, inside the vector's window.
    let now = unix(1_751_328_000);
    v.verify_evidence(&q, &rd, now).unwrap();
    v.verify_evidence(&q, &rd, now).unwrap();
    let first = v.inner.cache.lock().values().next().unwrap().clone();
    v.verify_evidence(&q, &rd, now).unwrap();
    let again = v.inner.cache.lock().values().next().unwrap().clone();
    assert!(
        Arc::ptr_eq(&first, &again),
        "the third call used the parsed collateral"
    );

    // One character of the signed TCB info changed: parsed afresh, and dcap-qvl refuses it.
    let text = String::from_utf8(good.clone()).unwrap();
    let tampered = text.replacen(
        "\\\"tcbEvaluationDataNumber\\\":17",
        "\\\"tcbEvaluationDataNumber\\\":18",
        1,
    );
    assert_ne!(tampered, text);
    std::fs::write(tmp.path().join("collateral.json"), &tampered).unwrap();
    for _ in 0..2 {
        let m = refusal(UntrustedChain, v.verify_evidence(&q, &rd, now));
        assert!(m.contains("Signature is invalid for"), "{m}");
    }
    assert_eq!(v.inner.cache.len(), 1);
    assert!(!Arc::ptr_eq(
        &first,
        v.inner.cache.lock().values().next().unwrap()
    ));

    // Back to the authentic bytes: the cached entry serves again.
    std::fs::write(tmp.path().join("collateral.json"), &good).unwrap();
    v.verify_evidence(&q, &rd, now).unwrap();
    v.verify_evidence(&q, &rd, now).unwrap();
    assert_eq!(v.inner.cache.len(), 1);

    // With the entry cached, a flipped quote byte, another report_data and a time past
    // the collateral's nextUpdate are each still refused.
    let mut bad = q.clone();
    bad[48 + 100] ^= 1;
    refusal(UntrustedChain, v.verify_evidence(&bad, &rd, now));
    let mut other = rd;
    other[63] ^= 1;
    refusal(Replay, v.verify_evidence(&q, &other, now));
    // 2025-08-01: the TCB info expired on 2025-07-19.
    let m = refusal(Expired, v.verify_evidence(&q, &rd, unix(1_754_006_400)));
    assert!(m.contains("expired at"), "{m}");
    v.verify_evidence(&q, &rd, now).unwrap();
}

#[test]
fn a_per_fmspc_file_added_later_is_used() {
    let (v, tmp, _) = verifier_over_copy("v4-uptodate");
    let q = quote("v4-uptodate");
    let rd = td_of(&q).report_data;
    let now = unix(1_751_328_000);
    v.verify_evidence(&q, &rd, now).unwrap();
    // Adding the file changes the directory's mtime (and a listing of a directory
    // changed under 2 s ago is not kept anyway): the new file is used at once.
    std::fs::write(tmp.path().join("collateral-b0c06f000000.json"), b"{}").unwrap();
    let e = v.verify_evidence(&q, &rd, now).err().unwrap();
    assert!(
        matches!(&e, Error::Config(m) if m.contains("collateral-b0c06f000000.json")),
        "{e}"
    );
}

#[test]
#[ignore = "profiling aid, run in release"]
fn profile_verify_parts() {
    use std::time::Instant;
    fn t(name: &str, n: u32, mut f: impl FnMut()) {
        f();
        let s = Instant::now();
        for _ in 0..n {
            f();
        }
        println!(
            "{name}: {:.1} us",
            s.elapsed().as_secs_f64() * 1e6 / n as f64
        );
    }
    for (dir, when) in [
        ("v4-uptodate", 1_751_328_000i64),
        ("v5-td15ex-uptodate", 1_792_454_400),
    ] {
        println!("== {dir}");
        let q = quote(dir);
        let d = vectors().join(dir);
        let c = read_collateral(&d.join("collateral.json")).unwrap();
        let n = 400;
        t("dcap plain", n, || {
            dcap_qvl::verify::QuoteVerifier::new_prod()
                .with_config::<dcap_qvl::configs::RingConfig>()
                .verify(&q, &c, when as u64)
                .unwrap();
        });
        let mut cfg = toml::Table::new();
        cfg.insert("collateral_dir".into(), d.display().to_string().into());
        let v = TdxVerifier::from_config(&cfg).unwrap();
        let rd: [u8; 64] = td_of(&q).report_data;
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(when as u64);
        t("ztid verify_evidence", n, || {
            v.verify_evidence(&q, &rd, now).unwrap();
        });
        t("read file", n, || {
            std::fs::read(d.join("collateral.json")).unwrap();
        });
        let bytes = std::fs::read(d.join("collateral.json")).unwrap();
        t("sha256 collateral", n, || {
            digest::digest(&digest::SHA256, &bytes);
        });
        t("serde collateral", n, || {
            let _: QuoteCollateralV3 = serde_json::from_slice(&bytes).unwrap();
        });
        t("Quote::parse", n, || {
            Quote::parse(&q).unwrap();
        });
        let pq = Quote::parse(&q).unwrap();
        t("quote_fmspc", n, || {
            dcap_qvl::intel::quote_fmspc(&pq).unwrap();
        });
        t("load_collateral", n, || {
            load_collateral(&d, &q).unwrap();
        });
        t("check_collateral_dates", n, || {
            check_collateral_dates(&c, when).unwrap();
        });
        t("collateral clone", n, || {
            let _ = std::hint::black_box(c.clone());
        });
        let vr = dcap_verify(&q, &c, when).unwrap();
        t("finish", n, || {
            finish(vr.clone(), Some(&rd), &Policy::default()).unwrap();
        });
        let fv = finish(vr.clone(), Some(&rd), &Policy::default()).unwrap();
        t("claims", n, || {
            claims(&q, &fv);
        });
        t("listing", n, || {
            v.inner.listing.per_fmspc_files(&d).unwrap();
        });
        t("sha256 quote", n, || {
            digest::digest(&digest::SHA256, &q);
        });
    }
}

// ---------------------------------------------------------------------------------------
// PCS fetching: nothing fetched for an unauthenticated platform, bounded for replays.

use crate::fetch::test_server::Server;
use crate::fetch::{Pool, MAX_REQUESTS_PER_MINUTE};

const ROOT_CRL: &str = "/IntelSGXRootCA.der";
/// 2025-07-01, inside the v4 vector's collateral window.
const V4_AT: u64 = 1_751_328_000;

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The PCS targets of the v4 vector's platform: (pckcrl, tcb, qe identity).
fn v4_targets() -> [String; 3] {
    [
        "/sgx/certification/v4/pckcrl?ca=platform&encoding=der".into(),
        "/tdx/certification/v4/tcb?fmspc=B0C06F000000".into(),
        "/tdx/certification/v4/qe/identity".into(),
    ]
}

/// Serves a vector's collateral the way PCS does; `tcb_info` replaces the signed TCB
/// info when given.
fn serve_pcs(server: &Server, dir: &str, tcb_info: Option<&str>) {
    let c: serde_json::Value = serde_json::from_slice(
        &std::fs::read(vectors().join(dir).join("collateral.json")).unwrap(),
    )
    .unwrap();
    let s = |k: &str| c[k].as_str().unwrap().to_string();
    let [pckcrl, tcb, qe] = v4_targets();
    server.serve_with(
        &pckcrl,
        hex::decode(s("pck_crl")).unwrap(),
        &[(
            "SGX-PCK-CRL-Issuer-Chain",
            &percent_encode(&s("pck_crl_issuer_chain")),
        )],
    );
    server.serve_with(
        &tcb,
        format!(
            r#"{{"tcbInfo":{},"signature":"{}"}}"#,
            tcb_info
                .map(str::to_string)
                .unwrap_or_else(|| s("tcb_info")),
            s("tcb_info_signature")
        )
        .into_bytes(),
        &[(
            "TCB-Info-Issuer-Chain",
            &percent_encode(&s("tcb_info_issuer_chain")),
        )],
    );
    server.serve_with(
        &qe,
        format!(
            r#"{{"enclaveIdentity":{},"signature":"{}"}}"#,
            s("qe_identity"),
            s("qe_identity_signature")
        )
        .into_bytes(),
        &[(
            "SGX-Enclave-Identity-Issuer-Chain",
            &percent_encode(&s("qe_identity_issuer_chain")),
        )],
    );
    server.serve(ROOT_CRL, hex::decode(s("root_ca_crl")).unwrap());
}

/// A verifier fetching from `server`, caching under `cache`.
fn pcs_verifier(server: &Server, cache: &Path) -> TdxVerifier {
    let cfg: toml::Table = toml::from_str(&format!(
        "pcs_fetch = true\npcs_url = {:?}\npcs_root_ca_crl_url = \"{}{ROOT_CRL}\"\npcs_cache_dir = {:?}",
        server.addr,
        server.addr,
        cache.display().to_string()
    ))
    .unwrap();
    TdxVerifier::from_config(&cfg).unwrap()
}

/// `q` with its `n`th PEM certificate (0: the PCK certificate) changed by `f`, keeping
/// every length (so the quote still parses).
fn with_cert(q: &[u8], n: usize, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    use base64::Engine;
    const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----\n";
    const END: &[u8] = b"\n-----END CERTIFICATE-----";
    let find = |from: usize, pat: &[u8]| {
        q[from..]
            .windows(pat.len())
            .position(|w| w == pat)
            .map(|i| i + from)
            .unwrap()
    };
    let mut start = 0;
    for _ in 0..=n {
        start = find(start, BEGIN) + BEGIN.len();
    }
    let end = find(start, END);
    let b64: Vec<u8> = q[start..end]
        .iter()
        .copied()
        .filter(|b| *b != b'\n')
        .collect();
    let e = base64::engine::general_purpose::STANDARD;
    let mut der = e.decode(&b64).unwrap();
    f(&mut der);
    let text = e.encode(&der);
    let lines: Vec<&str> = text
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let body = lines.join("\n");
    assert_eq!(body.len(), end - start, "same length");
    let mut out = q.to_vec();
    out[start..end].copy_from_slice(body.as_bytes());
    out
}

/// `q` whose PCK certificate names FMSPC `fmspc` (its signature then no longer holds).
fn with_fmspc(q: &[u8], fmspc: [u8; 6]) -> Vec<u8> {
    with_cert(q, 0, |der| {
        // The FMSPC extension: OID 1.2.840.113741.1.13.1.4, OCTET STRING of 6 bytes.
        let oid = hex::decode("060a2a864886f84d010d01040406").unwrap();
        let at = der.windows(oid.len()).position(|w| w == oid).unwrap() + oid.len();
        der[at..at + 6].copy_from_slice(&fmspc);
    })
}

fn rd_of(q: &[u8]) -> [u8; 64] {
    td_of(q).report_data
}

#[test]
fn the_pinned_root_is_dcap_qvls() {
    assert_eq!(
        hex::encode(digest::digest(
            &digest::SHA256,
            chain::INTEL_SGX_ROOT_CA_DER
        )),
        "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
    );
    assert_eq!(
        chain::INTEL_SGX_ROOT_CA_DER,
        std::fs::read(vectors().join("root/Intel_SGX_Root_CA.der")).unwrap()
    );
    // dcap-qvl anchored on this root accepts what its own pinned root does.
    for (dir, at) in [
        ("v4-uptodate", V4_AT),
        ("v5-td15ex-uptodate", 1_792_454_400),
    ] {
        let q = quote(dir);
        let c = read_collateral(&vectors().join(dir).join("collateral.json")).unwrap();
        dcap_qvl::verify::QuoteVerifier::new(chain::INTEL_SGX_ROOT_CA_DER.to_vec())
            .with_config::<dcap_qvl::configs::RingConfig>()
            .verify(&q, &c, at)
            .unwrap();
        let parsed = Quote::parse(&q).unwrap();
        let p = chain::authentic_platform(&parsed, at as i64).unwrap();
        assert_eq!(p, ([0xb0, 0xc0, 0x6f, 0, 0, 0], "platform"));
        // The vector's collateral checks out on its own, as fetched collateral must to
        // be cached before a quote verifies with it.
        chain::check_collateral(&c, &p.0, at as i64).unwrap();
        let m = chain::check_collateral(&c, &[0; 6], at as i64).unwrap_err();
        assert_eq!(m, "the TCB info is not for FMSPC 000000000000");
    }
}

/// A verifier fetching from a local PCS that serves the `v4-uptodate` collateral, with
/// that quote, its report_data and a time it verifies at.
struct V4Pcs {
    server: Server,
    v: TdxVerifier,
    q: Vec<u8>,
    rd: [u8; 64],
    now: std::time::SystemTime,
    tmp: tempfile::TempDir,
}

fn v4_pcs() -> V4Pcs {
    let server = Server::start();
    serve_pcs(&server, "v4-uptodate", None);
    let tmp = tempfile::tempdir().unwrap();
    let v = pcs_verifier(&server, &tmp.path().join("cache"));
    let q = quote("v4-uptodate");
    V4Pcs {
        rd: rd_of(&q),
        server,
        v,
        q,
        now: unix(V4_AT),
        tmp,
    }
}

/// A flood of quotes whose PCK certificates name made-up FMSPCs (or whose chain does not
/// end at the pinned root, or is not valid at the time) makes no request at all, so the
/// open budget stays whole for the genuine quote after it.
#[test]
fn pcs_fetching_needs_a_pck_chain_to_the_pinned_root() {
    let V4Pcs {
        server,
        v,
        q,
        rd,
        now,
        tmp,
    } = v4_pcs();
    let prefix = "the quote's PCK certificate chain does not verify to the pinned Intel SGX Root CA, so nothing is fetched from Intel PCS for it: ";
    for i in 0..MAX_REQUESTS_PER_MINUTE as u8 + 5 {
        let forged = with_fmspc(&q, [0xb0, 0xc0, 0x6f, 0, i, 1]);
        let m = refusal(UntrustedChain, v.verify_evidence(&forged, &rd, now));
        assert_eq!(
            m,
            format!("{prefix}the signature of the PCK certificate (Intel SGX PCK Certificate) by Intel SGX PCK Platform CA does not verify")
        );
    }
    // A chain ending in a root that is not the pinned one (a byte of its signature
    // changed): it is taken for an intermediate the pinned root does not sign.
    let other_root = with_cert(&q, 2, |der| {
        let n = der.len();
        der[n - 3] ^= 1;
    });
    let m = refusal(UntrustedChain, v.verify_evidence(&other_root, &rd, now));
    assert_eq!(
        m,
        format!("{prefix}the signature of issuer certificate 2 of the PCK certificate (Intel SGX Root CA) by Intel SGX Root CA does not verify")
    );
    // The genuine chain, at a time its PCK certificate is not valid (and no collateral is
    // cached for): refused before any request too.
    let m = refusal(
        UntrustedChain,
        v.verify_evidence(&q, &rd, unix(2_000_000_000)),
    );
    assert!(
        m.starts_with(&format!("{prefix}the PCK certificate (Intel SGX PCK Certificate) is not valid at 2033-05-18T03:33:20Z (valid from 2025-")),
        "{m}"
    );
    assert!(server.requests().is_empty(), "{:?}", server.requests());

    // The genuine quote: its collateral is fetched (the fixed URLs from their own
    // budget), verified and cached; the platform is then known.
    let [pckcrl, tcb, qe] = v4_targets();
    v.verify_evidence(&q, &rd, now).unwrap();
    assert_eq!(server.requests(), [pckcrl, tcb, qe, ROOT_CRL.to_string()]);
    let pcs = v.inner.pcs.as_ref().unwrap();
    assert!(pcs.is_known(&([0xb0, 0xc0, 0x6f, 0, 0, 0], "platform")));
    assert!(tmp
        .path()
        .join("cache/collateral-b0c06f000000-platform.json")
        .is_file());
}

/// Genuine PCK certificates replayed with garbage quotes: the collateral, which checks
/// out on its own, is cached at the first attempt, so the replays cost no request and
/// the genuine node is served from the cache.
#[test]
fn replayed_pck_chains_fetch_a_platforms_collateral_once() {
    let V4Pcs {
        server,
        v,
        q,
        rd,
        now,
        tmp,
    } = v4_pcs();
    for i in 0..MAX_REQUESTS_PER_MINUTE * 2 {
        let mut garbage = q.clone();
        garbage[48 + 100 + i] ^= 1;
        let m = refusal(UntrustedChain, v.verify_evidence(&garbage, &rd, now));
        assert!(m.starts_with("TDX quote verification failed: "), "{m}");
        if i == 0 {
            assert!(
                m.ends_with(&format!(
                    " (with collateral for FMSPC b0c06f000000 fetched from Intel PCS at {})",
                    server.addr
                )),
                "{m}"
            );
        }
    }
    assert_eq!(server.requests().len(), 4, "{:?}", server.requests());
    let file = tmp
        .path()
        .join("cache/collateral-b0c06f000000-platform.json");
    assert!(file.is_file(), "cached before any quote verified with it");
    let pcs = v.inner.pcs.as_ref().unwrap();
    assert!(!pcs.is_known(&([0xb0, 0xc0, 0x6f, 0, 0, 0], "platform")));
    v.verify_evidence(&q, &rd, now).unwrap();
    assert_eq!(server.requests().len(), 4);
}

/// Collateral that does not check out (a TCB info edited in transit) is not cached, and
/// neither it nor the fixed items are fetched again within a minute: dcap-qvl refuses
/// the quote with it each time.
#[test]
fn collateral_that_does_not_check_out_is_neither_cached_nor_refetched_at_once() {
    let server = Server::start();
    let c: serde_json::Value = serde_json::from_slice(
        &std::fs::read(vectors().join("v4-uptodate/collateral.json")).unwrap(),
    )
    .unwrap();
    let edited = c["tcb_info"].as_str().unwrap().replace(
        "\"tcbEvaluationDataNumber\":17",
        "\"tcbEvaluationDataNumber\":18",
    );
    serve_pcs(&server, "v4-uptodate", Some(&edited));
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let v = pcs_verifier(&server, &cache);
    let q = quote("v4-uptodate");
    let rd = rd_of(&q);
    for _ in 0..3 {
        let m = refusal(UntrustedChain, v.verify_evidence(&q, &rd, unix(V4_AT)));
        assert!(
            m.starts_with("TDX quote verification failed: Signature is invalid for tcb_info"),
            "{m}"
        );
    }
    assert_eq!(server.requests().len(), 4, "{:?}", server.requests());
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);
}

/// With the open budget spent (by anything), the fixed URLs still come from their own
/// budget, and a known platform's TCB info from the known-platform budget.
#[test]
fn a_spent_open_budget_leaves_fixed_urls_and_known_platforms_served() {
    let V4Pcs {
        server,
        v,
        q,
        rd,
        now,
        tmp: _tmp,
    } = v4_pcs();
    let pcs = v.inner.pcs.as_ref().unwrap();
    // Nothing listens on port 1: each request fails at once, but counts.
    for i in 0..MAX_REQUESTS_PER_MINUTE {
        pcs.client
            .get_pcs(&format!("http://127.0.0.1:1/{i}"), Pool::Open)
            .unwrap_err();
    }
    let [pckcrl, tcb, qe] = v4_targets();
    let m = refusal(CollateralUnavailable, v.verify_evidence(&q, &rd, now));
    assert_eq!(
        m,
        format!(
            "fetching TDX collateral for FMSPC b0c06f000000 from Intel PCS failed: GET {}{tcb}: not fetched: this verifier already made {MAX_REQUESTS_PER_MINUTE} requests in the last minute",
            server.addr
        )
    );
    assert_eq!(server.requests(), std::slice::from_ref(&pckcrl));
    // A platform verified before (here: told so) is served from its own budget.
    pcs.remember_verified(([0xb0, 0xc0, 0x6f, 0, 0, 0], "platform"));
    v.verify_evidence(&q, &rd, now).unwrap();
    assert_eq!(server.requests(), [pckcrl, tcb, qe, ROOT_CRL.to_string()]);
}
