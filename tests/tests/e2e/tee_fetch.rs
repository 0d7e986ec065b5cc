//! Optional collateral fetching (AMD KDS for SEV-SNP, Intel PCS for TDX) against a local
//! HTTP server that serves the real vectors in `../shared/vectors` (override with
//! `ZTID_VECTORS`) under KDS- and PCS-shaped paths and counts requests. Every
//! verification time is pinned inside the vector's window (the synthetic chain is made
//! now, so its checks run at the current time).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};
use ztid_tests::{at, refusal};

use ztid_verifier::RefusalKind::{
    CollateralUnavailable, Expired, KeyMismatch, Malformed, Revoked, UntrustedChain,
};
use ztid_verifier::{sev_snp, tdx};

// ---------------------------------------------------------------------------------
// Helpers shared with tee_snp.rs / tee_tdx.rs.

fn vectors_root() -> PathBuf {
    ztid_tests::vectors("snp");
    ztid_tests::vectors("tdx").join("..")
}

fn read(rel: &str) -> Vec<u8> {
    let p = vectors_root().join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn table(toml_text: &str) -> toml::Table {
    toml::from_str(toml_text).expect("toml")
}

fn der_of(pem_or_der: &[u8]) -> Vec<u8> {
    if pem_or_der.starts_with(b"-----BEGIN") {
        pem::parse(pem_or_der).unwrap().into_contents()
    } else {
        pem_or_der.to_vec()
    }
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

// ---------------------------------------------------------------------------------
// A tiny HTTP/1.1 server on 127.0.0.1: exact path+query routes, everything else 404.

#[derive(Clone)]
struct Route {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Route {
    fn ok(body: impl Into<Vec<u8>>) -> Self {
        Route {
            status: 200,
            headers: Vec::new(),
            body: body.into(),
        }
    }
    fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
}

struct Kds {
    addr: String,
    routes: Arc<Mutex<HashMap<String, Route>>>,
    /// Every request target, in order.
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn handle(mut s: TcpStream, routes: &Mutex<HashMap<String, Route>>, log: &Mutex<Vec<String>>) {
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 64 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let target = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("")
        .to_string();
    log.lock().unwrap().push(target.clone());
    let route = routes
        .lock()
        .unwrap()
        .get(&target)
        .cloned()
        .unwrap_or(Route {
            status: 404,
            headers: Vec::new(),
            body: b"not found".to_vec(),
        });
    let reason = match route.status {
        200 => "OK",
        404 => "Not Found",
        _ => "Error",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n",
        route.status,
        route.body.len()
    );
    for (k, v) in &route.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let _ = s.write_all(out.as_bytes());
    let _ = s.write_all(&route.body);
    let _ = s.flush();
}

impl Kds {
    fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", l.local_addr().unwrap());
        let routes: Arc<Mutex<HashMap<String, Route>>> = Default::default();
        let log: Arc<Mutex<Vec<String>>> = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (r, lg, st) = (routes.clone(), log.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for s in l.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(s) = s {
                    handle(s, &r, &lg);
                }
            }
        });
        Kds {
            addr,
            routes,
            log,
            stop,
            thread: Some(thread),
        }
    }

    fn serve(&self, target: &str, route: Route) {
        self.routes
            .lock()
            .unwrap()
            .insert(target.to_string(), route);
    }

    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Stops listening: later connections are refused.
    fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(self.addr.trim_start_matches("http://"));
            t.join().unwrap();
        }
    }
}

impl Drop for Kds {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------
// SEV-SNP and AMD KDS.

/// One real vector: its report, the VCEK KDS would serve, the KDS target for it, a time
/// inside its window, and its product.
struct SnpVector {
    report: &'static str,
    vcek: &'static str,
    target: &'static str,
    inside: &'static str,
    product: &'static str,
}

fn snp_report(rel: &str) -> Vec<u8> {
    let b = read(rel);
    if rel.ends_with(".hex") {
        hex::decode(String::from_utf8(b).unwrap().trim()).unwrap()
    } else {
        b
    }
}

/// The KDS target (path and query) a report's VCEK is fetched from, built here from the
/// report's chip_id and the TCB values in the vectors README.
fn vcek_target(report: &[u8], product: &str, query: &str) -> String {
    let chip_id = &report[0x1A0..0x1E0];
    let hwid = if product == "Turin" {
        &chip_id[..8]
    } else {
        chip_id
    };
    format!("/vcek/v1/{product}/{}?{query}", hex::encode(hwid))
}

fn snp_vectors() -> Vec<(SnpVector, String)> {
    let v = [
        SnpVector {
            report: "snp/milan-virtee-sev/report_milan.hex",
            vcek: "snp/milan-virtee-sev/vcek_milan.der",
            target: "blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=115",
            inside: "2025-06-01T00:00:00Z",
            product: "Milan",
        },
        SnpVector {
            report: "snp/genoa-trustee-azure/report.bin",
            vcek: "snp/genoa-trustee-azure/vcek.pem",
            target: "blSPL=10&teeSPL=00&snpSPL=23&ucodeSPL=84",
            inside: "2026-01-01T00:00:00Z",
            product: "Genoa",
        },
        SnpVector {
            report: "snp/turin-microsoft/report.bin",
            vcek: "snp/turin-microsoft/vcek.pem",
            target: "fmcSPL=01&blSPL=01&teeSPL=01&snpSPL=04&ucodeSPL=81",
            inside: "2026-06-01T00:00:00Z",
            product: "Turin",
        },
    ];
    v.into_iter()
        .map(|v| {
            let t = vcek_target(&snp_report(v.report), v.product, v.target);
            (v, t)
        })
        .collect()
}

fn kds_config(kds: &Kds, cache: &Path, extra: &str) -> toml::Table {
    table(&format!(
        "kds_fetch = true\nkds_url = {:?}\nkds_cache_dir = {:?}\n{extra}",
        kds.addr,
        cache.display().to_string()
    ))
}

#[test]
fn snp_vceks_are_fetched_once_then_served_from_the_cache() {
    let mut kds = Kds::start();
    let vectors = snp_vectors();
    for (v, target) in &vectors {
        kds.serve(target, Route::ok(der_of(&read(v.vcek))));
    }
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("kds-cache");
    // The real vectors ship no AMD CRL, so CRL fetching is off here (see the synthetic
    // test below for CRLs).
    let cfg = kds_config(&kds, &cache, "kds_crl = false");

    for (v, target) in &vectors {
        let before = kds.requests().len();
        let claims = sev_snp::verify_offline(&snp_report(v.report), None, None, at(v.inside), &cfg)
            .unwrap_or_else(|e| panic!("{}: {e}", v.report));
        assert_eq!(claims["product"], v.product);
        assert_eq!(claims["signing_key"], "VCEK");
        assert_eq!(kds.requests()[before..], [target.as_str()], "{}", v.report);
    }
    assert_eq!(mode(&cache), 0o700);
    let files = files_under(&cache);
    assert_eq!(files.len(), 3, "{files:?}");
    for (v, _) in &vectors {
        let f = files
            .iter()
            .find(|f| f.starts_with(&format!("{}/vcek-", v.product)))
            .unwrap_or_else(|| panic!("no cached VCEK for {} in {files:?}", v.product));
        assert_eq!(std::fs::read(cache.join(f)).unwrap(), der_of(&read(v.vcek)));
        assert_eq!(mode(&cache.join(f)), 0o600);
    }
    assert!(files.contains(&format!(
        "Milan/vcek-{}-bl03-tee00-snp08-uc115.der",
        hex::encode(&snp_report(vectors[0].0.report)[0x1A0..0x1E0])
    )));

    // The server is gone: every vector verifies from the cache, without a request.
    kds.stop();
    let n = kds.requests().len();
    for (v, _) in &vectors {
        sev_snp::verify_offline(&snp_report(v.report), None, None, at(v.inside), &cfg)
            .unwrap_or_else(|e| panic!("{} from the cache: {e}", v.report));
    }
    // Through the CA-side verifier too, with the report_data binding.
    let verifier = sev_snp::SnpVerifier::from_config(&cfg).unwrap();
    let rd: [u8; 64] = hex::decode("d447b55d197491bfe15cf298f9de9986b7a7c4be2468b4f6e2d53b71d7c645810b0f2cdfca0040433be063fc1a8293f0f3f8dae7b79fecb3d1cd82bd6a93ebfd").unwrap().try_into().unwrap();
    let node = verifier
        .verify_evidence(
            &snp_report(vectors[0].0.report),
            &rd,
            at(vectors[0].0.inside),
        )
        .unwrap();
    assert_eq!(node.method, "sev-snp");
    assert_eq!(kds.requests().len(), n, "no request once cached");

    // A cached VCEK is used only while valid: after it expires the CA asks KDS again,
    // which is down, and the refusal names the URL.
    let m = refusal(
        CollateralUnavailable,
        sev_snp::verify_offline(
            &snp_report(vectors[1].0.report),
            None,
            None,
            at("2032-02-01T00:00:00Z"),
            &cfg,
        ),
    );
    assert!(
        m.starts_with(&format!(
            "the report is signed by a VCEK that neither the evidence nor the collateral holds, and fetching it from AMD KDS failed: GET {}{}: ",
            kds.addr, vectors[1].1
        )),
        "{m}"
    );
}

#[test]
fn snp_fetching_is_off_by_default() {
    let kds = Kds::start();
    let (v, target) = &snp_vectors()[1];
    kds.serve(target, Route::ok(der_of(&read(v.vcek))));
    let missing = "the report is signed by a VCEK, but neither the evidence nor the collateral holds a VCEK certificate";
    let m = refusal(
        CollateralUnavailable,
        sev_snp::verify_offline(&snp_report(v.report), None, None, at(v.inside), &table("")),
    );
    assert_eq!(m, missing);
    let tmp = tempfile::tempdir().unwrap();
    let cfg = table(&format!(
        "kds_fetch = false\nkds_url = {:?}\nkds_cache_dir = {:?}",
        kds.addr,
        tmp.path().join("c").display().to_string()
    ));
    let m = refusal(
        CollateralUnavailable,
        sev_snp::verify_offline(&snp_report(v.report), None, None, at(v.inside), &cfg),
    );
    assert_eq!(m, missing);
    assert!(kds.requests().is_empty(), "nothing is fetched when off");
    assert!(!tmp.path().join("c").exists());
    // Setting a KDS key without kds_fetch is a config error, not a silent no-op.
    let e = sev_snp::verify_offline(
        &snp_report(v.report),
        None,
        None,
        at(v.inside),
        &table(&format!("kds_url = {:?}", kds.addr)),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("kds_url is set but kds_fetch is not"),
        "{e}"
    );
    // Fetching on without a cache directory: refused at config time.
    let e = sev_snp::SnpVerifier::from_config(&table("kds_fetch = true"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("needs kds_cache_dir"), "{e}");
    // An offline VCEK wins: nothing fetched.
    let cfg = kds_config(&kds, &tmp.path().join("c2"), "kds_crl = false");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vcek.pem"), read(v.vcek)).unwrap();
    sev_snp::verify_offline(
        &snp_report(v.report),
        Some(dir.path()),
        None,
        at(v.inside),
        &cfg,
    )
    .unwrap();
    assert!(kds.requests().is_empty());
}

#[test]
fn snp_kds_failures_are_refused_naming_the_url() {
    let kds = Kds::start();
    let vectors = snp_vectors();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let cfg = kds_config(&kds, &cache, "kds_crl = false");
    let (genoa, genoa_target) = &vectors[1];
    let url = format!("{}{}", kds.addr, genoa_target);
    // The Genoa report verified (and refused) at a time, with fetching on.
    let genoa_at = |kind, when: &str| {
        refusal(
            kind,
            sev_snp::verify_offline(&snp_report(genoa.report), None, None, at(when), &cfg),
        )
    };

    // 404.
    let m = genoa_at(CollateralUnavailable, genoa.inside);
    assert_eq!(
        m,
        format!("the report is signed by a VCEK that neither the evidence nor the collateral holds, and fetching it from AMD KDS failed: GET {url}: HTTP 404 Not Found")
    );
    // A version 2 report names no product: Milan, then Genoa, were asked.
    let (milan, milan_target) = &vectors[0];
    let m = refusal(
        CollateralUnavailable,
        sev_snp::verify_offline(
            &snp_report(milan.report),
            None,
            None,
            at(milan.inside),
            &cfg,
        ),
    );
    assert!(
        m.contains(&format!(
            "GET {}{milan_target}: HTTP 404 Not Found; GET {}/vcek/v1/Genoa/",
            kds.addr, kds.addr
        )),
        "{m}"
    );
    // Garbage with status 200.
    kds.serve(genoa_target, Route::ok(b"<html>hello</html>".to_vec()));
    let m = genoa_at(Malformed, genoa.inside);
    assert_eq!(
        m,
        format!("the VCEK fetched from {url} fails verification: collateral {url}: not a certificate or CRL")
    );
    // A genuine VCEK of another chip: checked like offline collateral, refused.
    kds.serve(
        genoa_target,
        Route::ok(read("snp/milan-trustee-vcek/vcek.der")),
    );
    let m = genoa_at(KeyMismatch, genoa.inside);
    assert!(
        m.starts_with(&format!("the VCEK fetched from {url} fails verification: {url} is not the VCEK of the report's chip at its reported TCB")),
        "{m}"
    );
    // The right VCEK, but at a time outside its validity: refused, nothing cached.
    kds.serve(genoa_target, Route::ok(der_of(&read(genoa.vcek))));
    let m = genoa_at(Expired, "2032-02-01T00:00:00Z");
    assert!(
        m.starts_with(&format!("the VCEK fetched from {url} fails verification: VCEK certificate SEV-VCEK expired at 2032-01-24T02:21:48Z")),
        "{m}"
    );
    assert!(
        files_under(&cache).is_empty(),
        "nothing unverified is cached"
    );
    // A body over the size cap.
    kds.serve(genoa_target, Route::ok(vec![b'x'; (1 << 20) + 1]));
    let m = genoa_at(CollateralUnavailable, genoa.inside);
    assert!(
        m.ends_with(&format!("GET {url}: response is larger than 1048576 bytes")),
        "{m}"
    );
    // A VLEK cannot be fetched: said so, and nothing is asked.
    let n = kds.requests().len();
    let m = refusal(
        CollateralUnavailable,
        sev_snp::verify_offline(
            &read("snp/milan-trustee-vlek/report.bin"),
            None,
            None,
            at("2025-06-01T00:00:00Z"),
            &table(&format!(
                "allowed_vmpl = [0, 1]\nkds_fetch = true\nkds_url = {:?}\nkds_cache_dir = {:?}",
                kds.addr,
                cache.display().to_string()
            )),
        ),
    );
    assert!(m.contains("a VLEK cannot be fetched from AMD KDS"), "{m}");
    assert_eq!(kds.requests().len(), n);
}

use ztid_test_support::snp_signer;

/// The test chain's ASK is not pinned (only its ARK is in `test_roots_dir`), so the
/// verifier needs the VCEK, the cert_chain and the CRL from KDS: each is checked under
/// the pinned (test) ARK before it is used or cached.
#[test]
fn snp_cert_chain_and_crl_are_fetched_checked_and_cached() {
    let chain = snp_signer::TestChain::new();
    // Another key under the same ARK name: the forged CRL and cert_chain below.
    let other = snp_signer::TestChain::new();
    // The one verification time, read once: after both chains are signed (a certificate's
    // notBefore is when openssl signed it) and given to every CRL as its thisUpdate, so a
    // second ticking while fixtures are made cannot make one "not yet valid".
    let now = SystemTime::now();
    let roots = tempfile::tempdir().unwrap();
    std::fs::copy(
        chain.roots_dir().join("ark.pem"),
        roots.path().join("ark.pem"),
    )
    .unwrap();
    let crl_der = |c: &snp_signer::TestChain, revoke: bool| {
        let d = tempfile::tempdir().unwrap();
        c.crl_at(d.path(), revoke, now, 1);
        der_of(&std::fs::read(d.path().join("amd.crl")).unwrap())
    };
    let report = chain.report(&[7u8; 64], |_| {});
    let vcek = format!(
        "/vcek/v1/Milan/{}?blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=209",
        hex::encode(chain.chip_id)
    );
    let cert_chain = [
        std::fs::read(chain.roots_dir().join("ask.pem")).unwrap(),
        std::fs::read(chain.roots_dir().join("ark.pem")).unwrap(),
    ]
    .concat();
    let serve_all = |kds: &Kds, crl: Vec<u8>| {
        kds.serve(&vcek, Route::ok(chain.vcek_der.clone()));
        kds.serve("/vcek/v1/Milan/cert_chain", Route::ok(cert_chain.clone()));
        kds.serve("/vcek/v1/Milan/crl", Route::ok(crl));
    };
    let config = |kds: &Kds, cache: &Path| {
        table(&format!(
            "test_roots_dir = {:?}\nkds_fetch = true\nkds_url = {:?}\nkds_cache_dir = {:?}",
            roots.path().display().to_string(),
            kds.addr,
            cache.display().to_string()
        ))
    };

    let mut kds = Kds::start();
    serve_all(&kds, crl_der(&chain, false));
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let cfg = config(&kds, &cache);
    let claims = sev_snp::verify_offline(&report, None, None, now, &cfg).unwrap();
    assert_eq!(claims["crl_checked"], true);
    assert_eq!(claims["trust_anchor"], "ARK-Milan (test root)");
    assert_eq!(
        kds.requests(),
        [
            vcek.clone(),
            "/vcek/v1/Milan/cert_chain".to_string(),
            "/vcek/v1/Milan/crl".to_string()
        ]
    );
    let mut want = vec![
        "Milan/vcek-cert_chain.pem".to_string(),
        "Milan/vcek-crl.der".to_string(),
        format!(
            "Milan/vcek-{}-bl03-tee00-snp08-uc209.der",
            hex::encode(chain.chip_id)
        ),
    ];
    want.sort();
    assert_eq!(files_under(&cache), want);
    kds.stop();
    let claims = sev_snp::verify_offline(&report, None, None, now, &cfg).unwrap();
    assert_eq!(claims["crl_checked"], true);
    assert_eq!(kds.requests().len(), 3, "served from the cache");
    // Past the cached CRL's nextUpdate (1 day) it is fetched again: KDS is down.
    let m = refusal(
        CollateralUnavailable,
        sev_snp::verify_offline(
            &report,
            None,
            None,
            now + Duration::from_secs(3 * 86400),
            &cfg,
        ),
    );
    assert!(
        m.starts_with(&format!(
            "the collateral holds no CRL from ARK-Milan and fetching it from AMD KDS failed: GET {}/vcek/v1/Milan/crl: ",
            kds.addr
        )),
        "{m}"
    );

    // A CRL revoking the ASK: fetched, authentic, applied.
    let kds = Kds::start();
    serve_all(&kds, crl_der(&chain, true));
    let cache2 = tmp.path().join("cache2");
    let m = refusal(
        Revoked,
        sev_snp::verify_offline(&report, None, None, now, &config(&kds, &cache2)),
    );
    assert_eq!(
        m,
        format!(
            "ASK SEV-Milan (serial 02) is revoked by CRL {}/vcek/v1/Milan/crl",
            kds.addr
        )
    );
    // A CRL signed by another key under the same ARK name: refused, not cached.
    serve_all(&kds, crl_der(&other, false));
    let cache3 = tmp.path().join("cache3");
    let m = refusal(
        UntrustedChain,
        sev_snp::verify_offline(&report, None, None, now, &config(&kds, &cache3)),
    );
    let url = format!("{}/vcek/v1/Milan/crl", kds.addr);
    assert_eq!(
        m,
        format!("the CRL fetched from {url} fails verification: CRL {url} signature does not verify under ARK-Milan")
    );
    assert!(!cache3.join("Milan/vcek-crl.der").exists());
    // A cert_chain whose ASK another key signed: refused.
    let forged = [
        std::fs::read(other.roots_dir().join("ask.pem")).unwrap(),
        std::fs::read(other.roots_dir().join("ark.pem")).unwrap(),
    ]
    .concat();
    kds.serve("/vcek/v1/Milan/cert_chain", Route::ok(forged));
    let cache4 = tmp.path().join("cache4");
    let m = refusal(
        UntrustedChain,
        sev_snp::verify_offline(&report, None, None, now, &config(&kds, &cache4)),
    );
    assert!(
        m.starts_with(&format!(
            "the VCEK fetched from {}{vcek} fails verification: the cert_chain fetched from {}/vcek/v1/Milan/cert_chain fails verification: ",
            kds.addr, kds.addr
        )),
        "{m}"
    );
    assert!(
        files_under(&cache4).is_empty(),
        "{:?}",
        files_under(&cache4)
    );
}

// ---------------------------------------------------------------------------------
// TDX and Intel PCS.

const FMSPC: &str = "b0c06f000000";
const ROOT_CRL_PATH: &str = "/IntelSGXRootCA.der";

fn tdx_quote(dir: &str) -> Vec<u8> {
    read(&format!("tdx/{dir}/quote.bin"))
}

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

/// PCS targets for a vector's collateral: (pckcrl, tcb, qe identity).
fn pcs_targets(collateral: &serde_json::Value) -> (String, String, String) {
    let chain = collateral["pck_crl_issuer_chain"].as_str().unwrap();
    let (_, p) = x509_parser::pem::parse_x509_pem(chain.as_bytes()).unwrap();
    let cert = p.parse_x509().unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    let ca = if cn.contains("Platform") {
        "platform"
    } else {
        "processor"
    };
    (
        format!("/sgx/certification/v4/pckcrl?ca={ca}&encoding=der"),
        format!(
            "/tdx/certification/v4/tcb?fmspc={}",
            FMSPC.to_ascii_uppercase()
        ),
        "/tdx/certification/v4/qe/identity".to_string(),
    )
}

/// Serves a vector's collateral.json the way PCS does; `tcb_info` replaces the signed
/// TCB info when given.
fn serve_pcs(pcs: &Kds, dir: &str, tcb_info: Option<&str>) -> serde_json::Value {
    let c: serde_json::Value =
        serde_json::from_slice(&read(&format!("tdx/{dir}/collateral.json"))).unwrap();
    let s = |k: &str| c[k].as_str().unwrap().to_string();
    let (pckcrl, tcb, qe) = pcs_targets(&c);
    pcs.serve(
        &pckcrl,
        Route::ok(hex::decode(s("pck_crl")).unwrap()).header(
            "SGX-PCK-CRL-Issuer-Chain",
            &percent_encode(&s("pck_crl_issuer_chain")),
        ),
    );
    pcs.serve(
        &tcb,
        Route::ok(format!(
            r#"{{"tcbInfo":{},"signature":"{}"}}"#,
            tcb_info
                .map(str::to_string)
                .unwrap_or_else(|| s("tcb_info")),
            s("tcb_info_signature")
        ))
        .header(
            "TCB-Info-Issuer-Chain",
            &percent_encode(&s("tcb_info_issuer_chain")),
        ),
    );
    pcs.serve(
        &qe,
        Route::ok(format!(
            r#"{{"enclaveIdentity":{},"signature":"{}"}}"#,
            s("qe_identity"),
            s("qe_identity_signature")
        ))
        .header(
            "SGX-Enclave-Identity-Issuer-Chain",
            &percent_encode(&s("qe_identity_issuer_chain")),
        ),
    );
    pcs.serve(
        ROOT_CRL_PATH,
        Route::ok(hex::decode(s("root_ca_crl")).unwrap()),
    );
    c
}

fn pcs_config(pcs: &Kds, cache: &Path, extra: &str) -> toml::Table {
    table(&format!(
        "pcs_fetch = true\npcs_url = {:?}\npcs_root_ca_crl_url = \"{}{ROOT_CRL_PATH}\"\npcs_cache_dir = {:?}\n{extra}",
        pcs.addr,
        pcs.addr,
        cache.display().to_string()
    ))
}

#[test]
fn tdx_collateral_is_fetched_cached_and_refetched_after_next_update() {
    let mut pcs = Kds::start();
    let c = serve_pcs(&pcs, "v4-uptodate", None);
    let (pckcrl, tcb, qe) = pcs_targets(&c);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("pcs-cache");
    let cfg = pcs_config(&pcs, &cache, "");
    let when = at("2025-07-01T00:00:00Z");

    let claims = tdx::verify_offline(&tdx_quote("v4-uptodate"), None, None, when, &cfg).unwrap();
    assert_eq!(claims["tcb_status"], "UpToDate");
    assert_eq!(
        pcs.requests(),
        [
            pckcrl.clone(),
            tcb.clone(),
            qe.clone(),
            ROOT_CRL_PATH.to_string()
        ]
    );
    // Cached per FMSPC and PCK CA (the CRL inside is that CA's).
    let ca = pckcrl
        .split("ca=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    let file = cache.join(format!("collateral-{FMSPC}-{ca}.json"));
    assert_eq!(mode(&cache), 0o700);
    assert_eq!(mode(&file), 0o600);
    let cached: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    for k in [
        "tcb_info",
        "qe_identity",
        "pck_crl",
        "root_ca_crl",
        "tcb_info_signature",
        "pck_crl_issuer_chain",
    ] {
        assert_eq!(
            cached[k], c[k],
            "cached {k} is what PCS served, byte for byte"
        );
    }

    // PCS gone: served from the cache, by the CA-side verifier too.
    pcs.stop();
    tdx::verify_offline(&tdx_quote("v4-uptodate"), None, None, when, &cfg).unwrap();
    let rd: [u8; 64] = hex::decode("9a9d48e7f6799642d3d1b34e1e5e1742d4bb02dd6ddd551862c1211d35c304f9eca3efdbb481601c163cf52493d6e44aed55d51ec39b7e518fadb92c2b523f20").unwrap().try_into().unwrap();
    let v = tdx::TdxVerifier::from_config(&cfg).unwrap();
    let node = v
        .verify_evidence(&tdx_quote("v4-uptodate"), &rd, when)
        .unwrap();
    assert_eq!(node.method, "tdx");
    assert_eq!(
        pcs.requests().len(),
        4,
        "no request while the cache is current"
    );

    // Past the cached collateral's nextUpdate: fetched again (PCS now serves the newer
    // collateral the TD 1.5 quote of the same platform needs), verified, cached.
    let pcs2 = Kds::start();
    serve_pcs(&pcs2, "v5-td15ex-uptodate", None);
    let cfg2 = pcs_config(&pcs2, &cache, "");
    let later = at("2026-10-20T00:00:00Z");
    let claims =
        tdx::verify_offline(&tdx_quote("v5-td15ex-uptodate"), None, None, later, &cfg2).unwrap();
    assert_eq!(claims["td_report"], "TD1.5-ex");
    assert_eq!(pcs2.requests().len(), 4);
    let cached: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let want: serde_json::Value =
        serde_json::from_slice(&read("tdx/v5-td15ex-uptodate/collateral.json")).unwrap();
    assert_eq!(cached["tcb_info"], want["tcb_info"]);
    tdx::verify_offline(&tdx_quote("v5-td15ex-uptodate"), None, None, later, &cfg2).unwrap();
    assert_eq!(pcs2.requests().len(), 4);
    // And the cache's validity is judged at the verification time: at the earlier time
    // the newer collateral is not yet valid, so it is fetched again.
    tdx::verify_offline(&tdx_quote("v4-uptodate"), None, None, when, &cfg2).unwrap_err();
    assert_eq!(pcs2.requests().len(), 8);
}

#[test]
fn tdx_fetching_is_off_by_default_and_offline_collateral_wins() {
    let pcs = Kds::start();
    serve_pcs(&pcs, "v4-uptodate", None);
    let tmp = tempfile::tempdir().unwrap();
    let when = at("2025-07-01T00:00:00Z");
    let quote = tdx_quote("v4-uptodate");
    // No collateral and no fetching: the existing refusals, nothing asked.
    let e = tdx::TdxVerifier::from_config(&table("")).err().unwrap();
    assert!(e.to_string().contains("collateral_dir is required"), "{e}");
    let e = tdx::verify_offline(&quote, None, None, when, &table("")).unwrap_err();
    assert!(e.to_string().contains("needs --collateral DIR"), "{e}");
    let cfg = table(&format!(
        "pcs_fetch = false\npcs_url = {:?}\npcs_cache_dir = {:?}",
        pcs.addr,
        tmp.path().join("c").display().to_string()
    ));
    let empty = tempfile::tempdir().unwrap();
    let e = tdx::verify_offline(&quote, Some(empty.path()), None, when, &cfg).unwrap_err();
    assert!(e.to_string().contains("reading TDX collateral"), "{e}");
    let e = tdx::verify_offline(
        &quote,
        Some(empty.path()),
        None,
        when,
        &table(&format!("pcs_url = {:?}", pcs.addr)),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("pcs_url is set but pcs_fetch is not"),
        "{e}"
    );
    assert!(pcs.requests().is_empty());
    assert!(!tmp.path().join("c").exists());

    // Fetching on, and the directory holds this FMSPC's collateral: no request.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        vectors_root().join("tdx/v4-uptodate/collateral.json"),
        dir.path().join(format!("collateral-{FMSPC}.json")),
    )
    .unwrap();
    let cache = tmp.path().join("cache");
    tdx::verify_offline(
        &quote,
        Some(dir.path()),
        None,
        when,
        &pcs_config(&pcs, &cache, ""),
    )
    .unwrap();
    assert!(pcs.requests().is_empty());
    // The directory's collateral.json is for another FMSPC (the SGX vector's): fetched.
    let other = tempfile::tempdir().unwrap();
    std::fs::copy(
        vectors_root().join("tdx/sgx-v3-negative/collateral.json"),
        other.path().join("collateral.json"),
    )
    .unwrap();
    tdx::verify_offline(
        &quote,
        Some(other.path()),
        None,
        when,
        &pcs_config(&pcs, &cache, ""),
    )
    .unwrap();
    assert_eq!(pcs.requests().len(), 4);
}

#[test]
fn tdx_pcs_failures_are_refused_naming_the_url() {
    let pcs = Kds::start();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let cfg = pcs_config(&pcs, &cache, "");
    let when = at("2025-07-01T00:00:00Z");
    let quote = tdx_quote("v4-uptodate");
    let c: serde_json::Value =
        serde_json::from_slice(&read("tdx/v4-uptodate/collateral.json")).unwrap();
    let (pckcrl, tcb, _) = pcs_targets(&c);
    let prefix = format!("fetching TDX collateral for FMSPC {FMSPC} from Intel PCS failed: ");

    // 404.
    let m = refusal(
        CollateralUnavailable,
        tdx::verify_offline(&quote, None, None, when, &cfg),
    );
    assert_eq!(
        m,
        format!("{prefix}GET {}{pckcrl}: HTTP 404 Not Found", pcs.addr)
    );
    // The issuer chain header missing.
    serve_pcs(&pcs, "v4-uptodate", None);
    pcs.serve(
        &pckcrl,
        Route::ok(hex::decode(c["pck_crl"].as_str().unwrap()).unwrap()),
    );
    let m = refusal(
        CollateralUnavailable,
        tdx::verify_offline(&quote, None, None, when, &cfg),
    );
    assert_eq!(
        m,
        format!(
            "{prefix}the response from {}{pckcrl} lacks the SGX-PCK-CRL-Issuer-Chain header",
            pcs.addr
        )
    );
    // Garbage TCB info.
    serve_pcs(&pcs, "v4-uptodate", None);
    pcs.serve(
        &tcb,
        Route::ok(b"hello".to_vec()).header("TCB-Info-Issuer-Chain", "x"),
    );
    let m = refusal(
        CollateralUnavailable,
        tdx::verify_offline(&quote, None, None, when, &cfg),
    );
    assert_eq!(
        m,
        format!(
            "{prefix}TCB-Info-Issuer-Chain from {}{tcb} holds no PEM certificate",
            pcs.addr
        )
    );
    serve_pcs(&pcs, "v4-uptodate", None);
    let chain = percent_encode(c["tcb_info_issuer_chain"].as_str().unwrap());
    pcs.serve(
        &tcb,
        Route::ok(b"hello".to_vec()).header("TCB-Info-Issuer-Chain", &chain),
    );
    let m = refusal(
        CollateralUnavailable,
        tdx::verify_offline(&quote, None, None, when, &cfg),
    );
    assert!(
        m.starts_with(&format!(
            "{prefix}the response from {}{tcb} is not JSON: ",
            pcs.addr
        )),
        "{m}"
    );
    // A TCB info edited in transit: dcap-qvl's signature check refuses it, as it would
    // offline, and nothing is cached.
    let edited = c["tcb_info"].as_str().unwrap().replace(
        "\"tcbEvaluationDataNumber\":17",
        "\"tcbEvaluationDataNumber\":18",
    );
    serve_pcs(&pcs, "v4-uptodate", Some(&edited));
    let m = refusal(
        UntrustedChain,
        tdx::verify_offline(&quote, None, None, when, &cfg),
    );
    assert_eq!(
        m,
        format!(
            "TDX quote verification failed: Signature is invalid for tcb_info in quote_collateral (with collateral for FMSPC {FMSPC} fetched from Intel PCS at {})",
            pcs.addr
        )
    );
    assert!(files_under(&cache).is_empty(), "{:?}", files_under(&cache));
    // The genuine collateral, but outside its window: refused with the date, not cached.
    serve_pcs(&pcs, "v4-uptodate", None);
    let m = refusal(
        Expired,
        tdx::verify_offline(&quote, None, None, at("2025-08-01T00:00:00Z"), &cfg),
    );
    assert!(
        m.starts_with("TDX collateral ")
            && m.contains("expired at")
            && m.ends_with(&format!(
                "(with collateral for FMSPC {FMSPC} fetched from Intel PCS at {})",
                pcs.addr
            )),
        "{m}"
    );
    assert!(files_under(&cache).is_empty());
}
