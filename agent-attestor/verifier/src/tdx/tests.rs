//! Unit tests over the real vectors in `../shared/vectors/tdx` (override with `ZTID_VECTORS`).

use super::*;
use ztid_attestation::RefusalKind::{Replay, Unsupported};

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
