//! The agent's own metrics (`ztid_workload_api_*`, `ztid_workload_*`, `ztid_agent_*`),
//! fed by one-line hooks in the agent and read at scrape time, served by
//! [`ztid_telemetry::listen`] when `--metrics ADDR:PORT` is set (off by default).
//!
//! Every label has a bounded set of values: RPC names from a fixed list, gRPC code
//! names, and a fixed kind.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Instant;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use ztid_telemetry::{encode, listen, register, GrpcMetricsLayer, Probe, LATENCY_BUCKETS};

use super::Runtime;
use crate::Error;

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

/// The Envoy SDS methods served on the Workload API socket (`DeltaSecrets` is refused
/// with `Unimplemented`, and counted so).
pub const SDS_RPCS: &[&str] = &["StreamSecrets", "FetchSecrets", "DeltaSecrets"];

/// The SDS service's gRPC path prefix.
const SDS_SERVICE: &str = "envoy.service.secret.v3.SecretDiscoveryService";

struct AgentMetrics {
    registry: Registry,
    calls: IntCounterVec,
    seconds: HistogramVec,
    sds_calls: IntCounterVec,
    sds_seconds: HistogramVec,
    instances: IntGauge,
    minted: IntCounterVec,
    svid_expiry: IntGauge,
    sync_failures: IntCounter,
    last_sync: IntGauge,
    sync_seconds: Histogram,
    server_failovers: IntCounter,
    connections: IntGauge,
    connection_refusals: IntCounterVec,
    idle_closed: IntCounter,
    container_failures: IntCounter,
}

#[allow(
    clippy::expect_used,
    reason = "constant metric names, help texts and labels, which prometheus accepts; the first use builds them, in every test too"
)]
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
        sds_calls: register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "ztid_sds_calls_total",
                    "Envoy SDS calls on the Workload API socket by method and gRPC status code at the start of the response.",
                ),
                &["rpc", "outcome"],
            )
            .expect("valid"),
        ),
        sds_seconds: register(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "ztid_sds_seconds",
                    "Envoy SDS latency until the response (or the stream's headers) starts, seconds.",
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
        server_failovers: register(
            &r,
            IntCounter::new(
                "ztid_agent_server_failovers_total",
                "Times the agent moved to another server of its --server list because the current one did not answer.",
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
        container_failures: register(
            &r,
            IntCounter::new(
                "ztid_workload_container_attestation_failures_total",
                "Callers whose cgroup named a container but got no container selectors (runtime down, container unknown or gone).",
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

/// The layer that counts and times Envoy SDS calls (on the same gRPC server).
pub fn sds_layer() -> GrpcMetricsLayer {
    GrpcMetricsLayer::new(
        SDS_SERVICE,
        SDS_RPCS,
        Some(METRICS.sds_calls.clone()),
        Some(METRICS.sds_seconds.clone()),
        SDS_RPCS,
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

/// Hook: a caller's container could not be attested (see `container`).
pub fn container_attestation_failed() {
    METRICS.container_failures.inc();
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

/// Hook: the agent moved to another server because the current one did not answer.
pub fn server_failover() {
    METRICS.server_failovers.inc();
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
        assert_eq!(ztid_telemetry::grpc_code_name(7), "PermissionDenied");
        assert_eq!(ztid_telemetry::grpc_code_name(99), "Unknown");
        let l = workload_api_layer();
        assert_eq!(
            l.rpc_of("/SpiffeWorkloadAPI/FetchX509SVID"),
            Some("FetchX509SVID")
        );
        assert_eq!(l.rpc_of("/SpiffeWorkloadAPI/Nope"), Some("unknown"));
        assert_eq!(l.rpc_of("/grpc.health.v1.Health/Check"), None);
        assert_eq!(l.rpc_of("/SpiffeWorkloadAPIx/FetchX509SVID"), None);
        let sds = sds_layer();
        assert_eq!(
            sds.rpc_of("/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets"),
            Some("StreamSecrets")
        );
        assert_eq!(
            sds.rpc_of("/envoy.service.secret.v3.SecretDiscoveryService/Other"),
            Some("unknown")
        );
        assert_eq!(sds.rpc_of("/SpiffeWorkloadAPI/FetchX509SVID"), None);
        assert_eq!(
            l.rpc_of("/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets"),
            None
        );
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

    #[test]
    fn failovers_count() {
        let before = METRICS.server_failovers.get();
        server_failover();
        assert_eq!(METRICS.server_failovers.get(), before + 1);
        assert!(encode(&METRICS.registry).contains("ztid_agent_server_failovers_total"));
    }
}
