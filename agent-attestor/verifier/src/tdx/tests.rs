//! Unit tests over the real vectors in `../shared/vectors/tdx` (override with `ZTID_VECTORS`).

use super::*;
use ztid_attestation::RefusalKind::Unsupported;

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
