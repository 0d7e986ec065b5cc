//! Telemetry: Prometheus metrics, `/live` and `/ready` on a small HTTP listener
//! (`--metrics ADDR:PORT`, off by default).
//!
//! Two parts:
//! - generic pieces the server reuses: the HTTP listener ([`listen`] over a
//!   [`Probe`]) and a tower layer that counts and times gRPC calls by method and
//!   status code ([`GrpcMetricsLayer`]);
//! - the agent's own metrics (`ztid_workload_api_*`, `ztid_workload_*`,
//!   `ztid_agent_*`), fed by one-line hooks in the agent and read at scrape time.
//!
//! Every label has a bounded set of values: RPC names from a fixed list, gRPC code
//! names, and a fixed kind.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use super::Runtime;
use crate::Error;

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
pub fn register<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

// ---------------------------------------------------------------------------------
// The agent's metrics.
// ---------------------------------------------------------------------------------

/// The Workload API methods, as in `/SpiffeWorkloadAPI/<rpc>`.
pub const WORKLOAD_RPCS: &[&str] = &[
    "FetchX509SVID",
    "FetchX509Bundles",
    "FetchJWTSVID",
    "FetchJWTBundles",
    "ValidateJWTSVID",
    "FetchWITSVID",
    "FetchWITBundles",
];

struct AgentMetrics {
    registry: Registry,
    calls: IntCounterVec,
    seconds: HistogramVec,
    instances: IntGauge,
    minted: IntCounterVec,
    svid_expiry: IntGauge,
    sync_failures: IntCounter,
    last_sync: IntGauge,
    sync_seconds: Histogram,
    connections: IntGauge,
    connection_refusals: IntCounterVec,
    idle_closed: IntCounter,
}

static METRICS: LazyLock<AgentMetrics> = LazyLock::new(|| {
    let r = Registry::new();
    AgentMetrics {
        calls: register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "ztid_workload_api_calls_total",
                    "Workload API calls by method and gRPC status code at the start of the response.",
                ),
                &["rpc", "outcome"],
            )
            .expect("valid"),
        ),
        seconds: register(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "ztid_workload_api_seconds",
                    "Workload API latency until the response (or the first stream message) starts, seconds.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["rpc"],
            )
            .expect("valid"),
        ),
        instances: register(
            &r,
            IntGauge::new(
                "ztid_workload_instances",
                "Workload process instances the agent currently holds identities for.",
            )
            .expect("valid"),
        ),
        minted: register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "ztid_workload_svids_minted_total",
                    "Workload SVIDs the server issued to this agent, by kind (x509, jwt).",
                ),
                &["kind"],
            )
            .expect("valid"),
        ),
        svid_expiry: register(
            &r,
            IntGauge::new(
                "ztid_agent_svid_expiry_seconds",
                "Seconds until the agent's own X509-SVID expires (negative once expired).",
            )
            .expect("valid"),
        ),
        sync_failures: register(
            &r,
            IntCounter::new(
                "ztid_agent_sync_failures_total",
                "Entry and bundle syncs with the server that failed.",
            )
            .expect("valid"),
        ),
        last_sync: register(
            &r,
            IntGauge::new(
                "ztid_agent_last_sync_success_timestamp_seconds",
                "Unix time of the last successful sync with the server (0: none yet).",
            )
            .expect("valid"),
        ),
        sync_seconds: register(
            &r,
            Histogram::with_opts(
                HistogramOpts::new(
                    "ztid_agent_sync_seconds",
                    "Duration of syncs with the server, seconds.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("valid"),
        ),
        connections: register(
            &r,
            IntGauge::new(
                "ztid_workload_connections",
                "Open Workload API connections.",
            )
            .expect("valid"),
        ),
        connection_refusals: register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "ztid_workload_connection_refusals_total",
                    "Workload API connections refused, or stopped serving, because of their peer: \
                     peer_exited, peer_execd, peer_credentials_changed, attestation_failed, \
                     uid_connection_limit, accept_failed.",
                ),
                &["reason"],
            )
            .expect("valid"),
        ),
        idle_closed: register(
            &r,
            IntCounter::new(
                "ztid_workload_connections_idle_closed_total",
                "Workload API connections closed for staying without a request too long, or to make room.",
            )
            .expect("valid"),
        ),
        registry: r,
    }
});

/// The running agent, once it has attested and its Workload API socket is bound.
static RUNTIME: OnceLock<Arc<Runtime>> = OnceLock::new();

/// The layer that counts and times Workload API calls (on the agent's gRPC server).
pub fn workload_api_layer() -> GrpcMetricsLayer {
    GrpcMetricsLayer::new(
        "SpiffeWorkloadAPI",
        WORKLOAD_RPCS,
        Some(METRICS.calls.clone()),
        Some(METRICS.seconds.clone()),
        WORKLOAD_RPCS,
    )
}

/// Hook: the server issued `n` workload SVIDs of `kind` (`x509` or `jwt`) to this agent.
pub fn svids_minted(kind: &'static str, n: usize) {
    if n > 0 {
        METRICS.minted.with_label_values(&[kind]).inc_by(n as u64);
    }
}

/// Hook: a Workload API connection opened (+1) or closed (-1).
pub fn workload_connections_open(delta: i64) {
    METRICS.connections.add(delta);
}

/// Hook: a Workload API connection or request refused because of its peer (`reason`).
pub fn workload_connection_refused(reason: &'static str) {
    METRICS
        .connection_refusals
        .with_label_values(&[reason])
        .inc();
}

/// Hook: an idle Workload API connection closed.
pub fn workload_connection_idle_closed() {
    METRICS.idle_closed.inc();
}

/// Hook: runs one sync with the server, timing it and counting a failure.
pub async fn observe_sync<T, E>(sync: impl Future<Output = Result<T, E>>) -> Result<T, E> {
    let start = Instant::now();
    let result = sync.await;
    METRICS.sync_seconds.observe(start.elapsed().as_secs_f64());
    match &result {
        Ok(_) => METRICS.last_sync.set(now_ms() / 1000),
        Err(_) => METRICS.sync_failures.inc(),
    }
    result
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Hook: the agent has attested, bound its Workload API socket and is about to serve:
/// from now on `/ready` answers 200 (while the agent SVID is valid).
pub(super) fn attach(rt: Arc<Runtime>) {
    let _ = RUNTIME.set(rt);
}

struct AgentProbe;

impl Probe for AgentProbe {
    async fn metrics(&self) -> String {
        let m = &*METRICS;
        if let Some(rt) = RUNTIME.get() {
            m.instances.set(rt.workloads.instance_count() as i64);
            m.svid_expiry
                .set(rt.svid.load().not_after - crate::unix_seconds(std::time::SystemTime::now()));
        }
        encode(&m.registry)
    }

    async fn ready(&self) -> Result<(), String> {
        let rt = RUNTIME
            .get()
            .ok_or("not attested yet, or the Workload API is not serving yet")?;
        if !rt.config.socket.exists() {
            return Err(format!(
                "Workload API socket {} is gone",
                rt.config.socket.display()
            ));
        }
        let left = rt.svid.load().not_after - crate::unix_seconds(std::time::SystemTime::now());
        if left <= 0 {
            return Err("the agent SVID has expired".into());
        }
        Ok(())
    }
}

/// Hook: starts the telemetry listener when `addr` is set (call first thing in `run`,
/// so `/live` answers while the agent attests).
pub async fn listen_if(addr: Option<SocketAddr>) -> Result<(), Error> {
    LazyLock::force(&METRICS);
    if let Some(addr) = addr {
        listen(addr, Arc::new(AgentProbe))
            .await
            .map_err(Error::io(format!("binding the metrics listener on {addr}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_and_rpc_labels_are_bounded() {
        assert_eq!(grpc_code_name(7), "PermissionDenied");
        assert_eq!(grpc_code_name(99), "Unknown");
        let l = workload_api_layer();
        assert_eq!(
            l.inner.rpc_of("/SpiffeWorkloadAPI/FetchX509SVID"),
            Some("FetchX509SVID")
        );
        assert_eq!(l.inner.rpc_of("/SpiffeWorkloadAPI/Nope"), Some("unknown"));
        assert_eq!(l.inner.rpc_of("/grpc.health.v1.Health/Check"), None);
        assert_eq!(l.inner.rpc_of("/SpiffeWorkloadAPIx/FetchX509SVID"), None);
    }

    #[tokio::test]
    async fn sync_observation_counts() {
        let before = METRICS.sync_failures.get();
        let _ = observe_sync(async { Err::<(), ()>(()) }).await;
        assert_eq!(METRICS.sync_failures.get(), before + 1);
        let _ = observe_sync(async { Ok::<(), ()>(()) }).await;
        assert!(METRICS.last_sync.get() > 0);
        let text = encode(&METRICS.registry);
        assert!(text.contains("ztid_agent_sync_failures_total"));
    }
}
