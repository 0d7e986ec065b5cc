//! The token endpoint's client: HTTPS/1.1 over tokio-rustls (trusting the server's
//! bundle, optionally presenting an X.509-SVID), keep-alive connections, form bodies,
//! and the timed load of `POST /token` with N requests in flight.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

use crate::load::{cores, machine_busy_secs};
use crate::measure::{CpuWindow, Lat};

/// RFC 8693's grant type.
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// Token type of an access token this server issued.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// Token type of a JWT-SVID.
pub const JWT_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";

/// An X.509-SVID to present as the TLS client certificate.
#[derive(Clone)]
pub struct ClientCert {
    /// Leaf first, DER.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER.
    pub key: Vec<u8>,
}

/// Where and how to connect.
#[derive(Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub tls: Arc<ClientConfig>,
}

/// A TLS client configuration trusting `roots` (the server's bundle), presenting `cert`.
pub fn tls_config(roots: &[Vec<u8>], cert: Option<&ClientCert>) -> Arc<ClientConfig> {
    let mut store = RootCertStore::empty();
    for der in roots {
        store
            .add(CertificateDer::from(der.clone()))
            .expect("bundle certificate is a trust anchor");
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(store);
    let config = match cert {
        Some(c) => builder
            .with_client_auth_cert(
                c.chain
                    .iter()
                    .map(|d| CertificateDer::from(d.clone()))
                    .collect(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key.clone())),
            )
            .expect("client certificate and key"),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// One keep-alive HTTP/1.1 connection.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

impl Conn {
    /// TCP (no Nagle: one small request, one small answer), TLS, HTTP/1.1 handshake.
    pub async fn open(ep: &Endpoint) -> Result<Self, String> {
        let tcp = tokio::net::TcpStream::connect(ep.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", ep.addr))?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let name = ServerName::try_from(ep.addr.ip().to_string()).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(ep.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self {
            sender,
            host: ep.addr.to_string(),
        })
    }

    /// One request; (status, body).
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        form: Option<Bytes>,
    ) -> Result<(StatusCode, Bytes), String> {
        self.sender
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.host);
        if form.is_some() {
            req = req.header(CONTENT_TYPE, "application/x-www-form-urlencoded");
        }
        let req = req
            .body(Full::new(form.unwrap_or_default()))
            .map_err(|e| e.to_string())?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("answer body: {e}"))?
            .to_bytes();
        Ok((status, body))
    }
}

/// `application/x-www-form-urlencoded` of `pairs`.
pub fn form(pairs: &[(&str, &str)]) -> Bytes {
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(&urlencode(k));
        out.push('=');
        out.push_str(&urlencode(v));
    }
    Bytes::from(out)
}

fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The claims of a compact JWS (not verified: the bench only checks what it was given).
pub fn claims_of(jwt: &str) -> serde_json::Value {
    let payload = jwt.split('.').nth(1).expect("a compact JWS");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url claims");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

/// One `POST /token`: the access token, or the refusal (status and body).
pub async fn exchange_once(ep: &Endpoint, body: Bytes) -> Result<String, String> {
    let mut conn = Conn::open(ep).await?;
    let (status, answer) = conn.call("POST", "/token", Some(body)).await?;
    let text = String::from_utf8_lossy(&answer).into_owned();
    if status != StatusCode::OK {
        return Err(format!("{status}: {text}"));
    }
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("answer is not JSON ({e}): {text}"))?;
    v["access_token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("no access_token in {text}"))
}

/// One timed load.
#[derive(Clone, Debug, Default)]
pub struct LoadRun {
    pub in_flight: usize,
    /// Successful exchanges started in the window.
    pub ok: u64,
    /// Refused or failed requests started in the window.
    pub errors: u64,
    /// The first refusal or failure, if any.
    pub first_error: Option<String>,
    /// From the window's start to the last answer of a request started in it.
    pub secs: f64,
    /// Latency of the successful requests started in the window.
    pub lat: Lat,
    /// (server, agent, bench) CPU seconds in the window.
    pub cpu: [f64; 3],
    /// Share of the machine other processes used in the window.
    pub foreign: f64,
}

impl LoadRun {
    pub fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.ok as f64 / self.secs
        } else {
            0.0
        }
    }
    /// Server CPU per successful exchange, µs.
    pub fn server_us(&self) -> f64 {
        if self.ok == 0 {
            return 0.0;
        }
        self.cpu[0] * 1e6 / self.ok as f64
    }
}

/// `in_flight` keep-alive connections (opened before the clock starts), each sending
/// `body` back to back: a warm-up, then the measured window of `dur`.
pub async fn load(
    ep: &Endpoint,
    body: Bytes,
    in_flight: usize,
    warm: Duration,
    dur: Duration,
    pids: (u32, u32),
) -> LoadRun {
    let mut conns = Vec::with_capacity(in_flight);
    for _ in 0..in_flight {
        conns.push(Conn::open(ep).await.expect("connect to the token endpoint"));
    }
    let window_start = Instant::now() + warm;
    let window_end = window_start + dur;
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let body = body.clone();
            let ep = ep.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                let mut first_error = None;
                let mut last_end = window_start;
                loop {
                    let t0 = Instant::now();
                    if t0 >= window_end {
                        break;
                    }
                    let r = conn.call("POST", "/token", Some(body.clone())).await;
                    let t1 = Instant::now();
                    let counted = t0 >= window_start;
                    if counted {
                        last_end = last_end.max(t1);
                    }
                    match r {
                        Ok((StatusCode::OK, _)) => {
                            if counted {
                                lat.push(t1 - t0);
                            }
                        }
                        Ok((status, answer)) => {
                            errors += u64::from(counted);
                            first_error.get_or_insert_with(|| {
                                format!("{status}: {}", String::from_utf8_lossy(&answer))
                            });
                        }
                        Err(e) => {
                            errors += u64::from(counted);
                            first_error.get_or_insert(e);
                            // The connection is gone; open another one.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            if let Ok(c) = Conn::open(&ep).await {
                                conn = c;
                            }
                        }
                    }
                }
                (lat, errors, first_error, last_end)
            })
        })
        .collect();
    tokio::time::sleep_until(window_start.into()).await;
    let busy0 = machine_busy_secs();
    let cpu = CpuWindow::start(pids.0, pids.1);
    tokio::time::sleep_until(window_end.into()).await;
    let ours = cpu.stop();
    let busy = machine_busy_secs() - busy0;
    let mut run = LoadRun {
        in_flight,
        ..LoadRun::default()
    };
    let mut all = Vec::new();
    let mut last = window_start;
    for t in tasks {
        let (lat, errors, first_error, last_end) = t.await.expect("load task");
        run.ok += lat.len() as u64;
        run.errors += errors;
        if run.first_error.is_none() {
            run.first_error = first_error;
        }
        last = last.max(last_end);
        all.extend(lat);
    }
    run.cpu = ours;
    run.foreign = (busy - ours.iter().sum::<f64>()).max(0.0) / (dur.as_secs_f64() * cores());
    run.secs = (last - window_start).as_secs_f64().max(dur.as_secs_f64());
    run.lat = Lat::of(all);
    run
}
