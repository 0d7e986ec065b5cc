//! Telemetry both `ztid-server` and `ztid-agent` serve: Prometheus metrics, `/live`
//! and `/ready` on a small HTTP listener (`--metrics ADDR:PORT`, off by default).
//!
//! - [`listen`]: the HTTP listener over a [`Probe`] the process implements;
//! - [`GrpcMetricsLayer`]: a tower layer that counts and times gRPC calls by method
//!   and status code.
//!
//! Every label has a bounded set of values: RPC names from a fixed list and gRPC code
//! names. Each binary's own metrics live in that binary's crate.
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use prometheus::{Encoder, HistogramVec, IntCounterVec, Registry, TextEncoder};

// ---------------------------------------------------------------------------------
// Generic: the HTTP listener.
// ---------------------------------------------------------------------------------

/// What the telemetry listener asks the process.
pub trait Probe: Send + Sync + 'static {
    /// The Prometheus text exposition of every metric (refreshing gauges first).
    fn metrics(&self) -> impl Future<Output = String> + Send;
    /// `Ok` when the process serves; `Err(why)` otherwise.
    fn ready(&self) -> impl Future<Output = Result<(), String>> + Send;
}

/// Most telemetry connections served at once; more wait in the backlog.
const MAX_CONNECTIONS: usize = 32;
/// A telemetry connection is closed after this long, whatever it is doing: a scrape
/// takes milliseconds, so nothing legitimate holds a slot longer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's headers must be complete this long after it starts (slowloris: a header
/// line every few seconds would otherwise hold a slot for the whole connection timeout).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a readiness check may take before it counts as "not ready".
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Binds `addr` and serves `GET /metrics`, `GET /live` and `GET /ready` from `probe`
/// in the background; returns the bound address.
pub async fn listen<P: Probe>(addr: SocketAddr, probe: Arc<P>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "telemetry accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let probe = probe.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let probe = probe.clone();
                    async move { Ok::<_, Infallible>(respond(probe.as_ref(), req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .keep_alive(true)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
                drop(permit);
            });
        }
    });
    tracing::info!(metrics = %local, "telemetry listener: /metrics, /live, /ready");
    Ok(local)
}

#[allow(
    clippy::expect_used,
    reason = "every caller passes a constant status and content type, which the builder accepts"
)]
fn reply(status: u16, content_type: &str, body: String) -> http::Response<Full<Bytes>> {
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

async fn respond<P: Probe, B>(probe: &P, req: http::Request<B>) -> http::Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != http::Method::GET {
        return reply(405, TEXT, "only GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => reply(200, prometheus::TEXT_FORMAT, probe.metrics().await),
        "/live" => reply(200, TEXT, "live\n".into()),
        "/ready" => match tokio::time::timeout(READY_TIMEOUT, probe.ready()).await {
            Ok(Ok(())) => reply(200, TEXT, "ready\n".into()),
            Ok(Err(why)) => reply(503, TEXT, format!("not ready: {why}\n")),
            Err(_) => reply(503, TEXT, "not ready: readiness check timed out\n".into()),
        },
        _ => reply(
            404,
            TEXT,
            "not found; try /metrics, /live or /ready\n".into(),
        ),
    }
}

/// The text exposition of a registry.
pub fn encode(registry: &Registry) -> String {
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut out) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    String::from_utf8(out).unwrap_or_default()
}

// ---------------------------------------------------------------------------------
// Generic: a tower layer counting and timing gRPC calls.
// ---------------------------------------------------------------------------------

/// The gRPC status code name (`OK`, `PermissionDenied`, ...) of a numeric code.
pub fn grpc_code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "Cancelled",
        2 => "Unknown",
        3 => "InvalidArgument",
        4 => "DeadlineExceeded",
        5 => "NotFound",
        6 => "AlreadyExists",
        7 => "PermissionDenied",
        8 => "ResourceExhausted",
        9 => "FailedPrecondition",
        10 => "Aborted",
        11 => "OutOfRange",
        12 => "Unimplemented",
        13 => "Internal",
        14 => "Unavailable",
        15 => "DataLoss",
        16 => "Unauthenticated",
        _ => "Unknown",
    }
}

/// Counts (`{rpc,outcome}`) and times (`{rpc}`) the calls of one gRPC service.
///
/// The outcome is the status the handler answered with when the response starts:
/// for a server stream that is the status of opening it (an error later in the
/// stream is not counted). The time is until the response starts. Methods not in
/// `rpcs` are counted as `rpc="unknown"`; other services are not counted.
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    inner: Arc<GrpcInstruments>,
}

struct GrpcInstruments {
    prefix: &'static str,
    rpcs: &'static [&'static str],
    calls: Option<IntCounterVec>,
    seconds: Option<HistogramVec>,
    timed: &'static [&'static str],
}

impl GrpcMetricsLayer {
    /// A layer for the service at `/<service>/`, counting into `calls` (labels
    /// `rpc`, `outcome`) and timing the methods in `timed` into `seconds` (label `rpc`).
    pub fn new(
        service: &'static str,
        rpcs: &'static [&'static str],
        calls: Option<IntCounterVec>,
        seconds: Option<HistogramVec>,
        timed: &'static [&'static str],
    ) -> Self {
        Self {
            inner: Arc::new(GrpcInstruments {
                prefix: service,
                rpcs,
                calls,
                seconds,
                timed,
            }),
        }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            m: self.inner.clone(),
        }
    }
}

/// The service [`GrpcMetricsLayer`] wraps around a router.
#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    m: Arc<GrpcInstruments>,
}

impl GrpcMetricsLayer {
    /// The `rpc` label a request path gets: `None` for other services, `unknown`
    /// for methods not in the list.
    pub fn rpc_of(&self, path: &str) -> Option<&'static str> {
        self.inner.rpc_of(path)
    }
}

impl GrpcInstruments {
    fn rpc_of(&self, path: &str) -> Option<&'static str> {
        let method = path
            .strip_prefix('/')?
            .strip_prefix(self.prefix)?
            .strip_prefix('/')?;
        Some(
            self.rpcs
                .iter()
                .find(|r| **r == method)
                .copied()
                .unwrap_or("unknown"),
        )
    }
}

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let rpc = self.m.rpc_of(req.uri().path());
        let start = Instant::now();
        let fut = self.inner.call(req);
        let m = self.m.clone();
        Box::pin(async move {
            let res = fut.await;
            if let Some(rpc) = rpc {
                let outcome = match &res {
                    // A handler error is a trailers-only response: the status is in the headers.
                    Ok(r) => r
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map(grpc_code_name)
                        .unwrap_or("OK"),
                    Err(_) => "Unavailable",
                };
                if let Some(c) = &m.calls {
                    c.with_label_values(&[rpc, outcome]).inc();
                }
                if let Some(h) = &m.seconds {
                    if m.timed.contains(&rpc) {
                        h.with_label_values(&[rpc])
                            .observe(start.elapsed().as_secs_f64());
                    }
                }
            }
            res
        })
    }
}

/// Latency buckets (seconds) for calls that sign: sub-millisecond to seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Registers `c` in `r` (names are static and unique, so this cannot fail).
#[allow(
    clippy::expect_used,
    reason = "callers register metrics with constant, distinct names at start-up; a clash is a programming error every test that builds the registry would hit"
)]
pub fn register<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

// ---------------------------------------------------------------------------------
// The agent's metrics.
// ---------------------------------------------------------------------------------
