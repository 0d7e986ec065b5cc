//! A workload for the rotation test: holds a FetchX509SVID stream open through the
//! `spiffe` crate, validates the SVID it holds against the bundle it holds every
//! `ZTID_CHECK_INTERVAL_MS` (default 500 ms; RFC 5280 path validation by
//! rustls-webpki) and on every update, and prints one JSON line per update and a
//! summary when stdin closes.
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::io::AsyncReadExt;

#[derive(Default)]
struct Held {
    chain: Vec<Vec<u8>>,
    roots: Vec<Vec<u8>>,
}

fn authority_of(chain: &[Vec<u8>], roots: &[Vec<u8>]) -> String {
    ztid_spiffe::svid::issuing_authority_of_chain(chain, roots).unwrap_or_default()
}

fn validate(h: &Held) -> Result<(), String> {
    let chain: Vec<_> = h
        .chain
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let roots: Vec<_> = h.roots.iter().cloned().map(CertificateDer::from).collect();
    ztid_spiffe::svid::verify_chain(
        &chain,
        &roots,
        UnixTime::now(),
        ztid_spiffe::svid::Usage::Client,
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let endpoint = std::env::var("SPIFFE_ENDPOINT_SOCKET").expect("SPIFFE_ENDPOINT_SOCKET");
    let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
        .await
        .expect("connect");
    let mut stream = client.stream_x509_contexts().await.expect("stream");
    let held = Arc::new(Mutex::new(Held::default()));
    let checks = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));

    let (h, c, f) = (held.clone(), checks.clone(), failures.clone());
    tokio::spawn(async move {
        let every = std::env::var("ZTID_CHECK_INTERVAL_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(500);
        let mut tick = tokio::time::interval(Duration::from_millis(every));
        loop {
            tick.tick().await;
            let g = h.lock().unwrap();
            if g.chain.is_empty() {
                continue;
            }
            let n = c.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if let Err(e) = validate(&g) {
                f.lock().unwrap().push(e);
            }
            // Tests wait on these rather than on the clock.
            println!("{}", serde_json::json!({"event": "check", "checks": n}));
        }
    });

    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(Ok(ctx)) = msg else {
                    println!("{}", serde_json::json!({"event": "stream_error", "error": format!("{:?}", msg.map(|m| m.err()))}));
                    break;
                };
                let Some(svid) = ctx.default_svid() else { continue };
                let td = svid.spiffe_id().trust_domain();
                let roots: Vec<Vec<u8>> = ctx
                    .bundle_set()
                    .get(td)
                    .map(|b| b.authorities().iter().map(|a| a.as_bytes().to_vec()).collect())
                    .unwrap_or_default();
                let chain: Vec<Vec<u8>> = svid.cert_chain().iter().map(|c| c.as_bytes().to_vec()).collect();
                let authority = authority_of(&chain, &roots);
                let bundle_ids: Vec<String> = roots
                    .iter()
                    .filter_map(|r| {
                        use x509_parser::prelude::FromDer;
                        x509_parser::prelude::X509Certificate::from_der(r).ok().map(|(_, c)| hex::encode(c.raw_serial()))
                    })
                    .collect();
                let mut g = held.lock().unwrap();
                *g = Held { chain, roots };
                let ok = validate(&g).is_ok();
                if !ok {
                    failures.lock().unwrap().push("update did not validate".into());
                }
                println!("{}", serde_json::json!({"event": "update", "spiffe_id": svid.spiffe_id().to_string(), "authority": authority, "bundle": bundle_ids, "valid": ok}));
            }
            n = stdin.read(&mut buf) => {
                if matches!(n, Ok(0) | Err(_)) { break; }
            }
        }
    }
    let f = failures.lock().unwrap();
    println!(
        "{}",
        serde_json::json!({"event": "summary", "checks": checks.load(std::sync::atomic::Ordering::Relaxed), "failures": f.len(), "first_failure": f.first()})
    );
}
