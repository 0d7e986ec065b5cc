//! The Workload API socket: every accepted connection is bound to the process that made
//! it ([`crate::workload_attestation`]) and served over HTTP/2 within fixed bounds, so
//! neither a stale connection nor a flood of idle ones gets anything or exhausts the agent.
//!
//! Bounds (the README's "Workload API" section lists them too):
//!
//! - **Connections**: at most `workload_max_connections` (default 1,024), and never more
//!   than the descriptor limit allows, `(RLIMIT_NOFILE - 128) / 2`, read at every accept:
//!   a connection holds its socket and its peer's pidfd, and 128 descriptors stay free for
//!   the agent's own work (server connection, files, attestation). At the cap the agent
//!   makes room by closing the connection doing least (one that never made a request,
//!   else an idle one, oldest first); if every one has a request in progress, new
//!   connections wait in the listen backlog.
//! - **Per uid**: one local user holds at most half of that cap; more of its connections
//!   are closed as soon as they are accepted.
//! - **Attestation at accept**: at most 16 at a time, 4 of them for one uid, 5 s each
//!   (an executable is hashed only up to 1 GiB and 3 s).
//! - **Idle**: a connection with no request in progress for `workload_idle_timeout_seconds`
//!   (default 30 s) is closed. The clock starts at accept, and only requests stop it, not
//!   bytes: a request counts from when its message has fully arrived until its answer
//!   ends, so a client that never finishes its preface, its headers or its message, or
//!   only pings, is closed on the same schedule (and can be closed for room). A connection that never made a request is dropped then;
//!   one that did gets an HTTP/2 GOAWAY and is dropped 10 s later if still open. Health
//!   checks (`grpc.health.v1`) do not count as requests.
//! - **Per connection**: 16 concurrent streams, 16 KiB of request headers, 64 KiB per
//!   request message, 30 s for an answer to start, and an HTTP/2 ping every 60 s that must
//!   be answered within 20 s.
//!
//! On top of the check at every request and before every stream message, a connection
//! with open streams checks its peer every 2 s, so a stream whose process has exited or
//! exec'd ends (with the reason) instead of staying open for whoever holds the socket.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Notify, Semaphore};
use ztid_h2_authority::AuthorityFixingStream;

use crate::workload_attestation::{
    attest_peer, peer_pidfd_supported, AttestedPeer, ConnectTimePeer, PeerRefusal,
};

/// Default cap on open Workload API connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default time a connection may stay without a request in progress.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Descriptors kept for the agent's own work whatever the connection count.
pub const RESERVED_DESCRIPTORS: u64 = 128;
/// Descriptors one connection holds: its socket and its peer's pidfd.
pub const DESCRIPTORS_PER_CONNECTION: u64 = 2;
/// Accept-time attestations running at once (each reads /proc, maybe hashes a binary).
pub const MAX_CONCURRENT_ATTESTATIONS: usize = 16;
/// Accept-time attestations one uid may run at once: one user's expensive ones (large
/// executables to hash) never take every slot from the others.
pub const MAX_CONCURRENT_ATTESTATIONS_PER_UID: usize = 4;
/// Longest accept-time attestation.
pub const ATTESTATION_TIMEOUT: Duration = Duration::from_secs(5);
/// After GOAWAY, how long open streams may take before the connection is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// How often a connection with requests in progress (open streams) checks that its peer
/// has not exited or exec'd.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Concurrent streams per connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// Request header block limit.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// Largest request message (Workload API requests are a few hundred bytes; a JWT to
/// validate a few KiB).
pub const MAX_REQUEST_MESSAGE_BYTES: usize = 64 * 1024;
/// Longest wait for an answer to start.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 keepalive: ping interval and how long the answer may take.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// See [`KEEPALIVE_INTERVAL`].
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The configurable bounds of the Workload API socket.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Cap on open connections (lowered further by the descriptor limit).
    pub max_connections: usize,
    /// Time without a request in progress after which a connection is closed.
    pub idle_timeout: Duration,
    /// Connections the process's other sockets served this way may hold at most: when
    /// the caps together exceed what the descriptor limit leaves room for, each is
    /// lowered in proportion, so all of them full never exhaust the descriptors.
    pub others_max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            others_max_connections: 0,
        }
    }
}

/// What requests on one connection know about the process at its other end; a request
/// extension (`Arc<ConnectionPeer>`).
pub struct ConnectionPeer {
    /// SO_PEERCRED pid at connect (for logs).
    pub pid: Option<i32>,
    /// SO_PEERCRED uid at connect.
    pub uid: u32,
    attested: Result<AttestedPeer, PeerRefusal>,
    /// Set, for good, once the peer is seen to have exited or exec'd.
    revoked: watch::Sender<Option<PeerRefusal>>,
}

impl ConnectionPeer {
    fn new(pid: Option<i32>, uid: u32, attested: Result<AttestedPeer, PeerRefusal>) -> Self {
        Self {
            pid,
            uid,
            attested,
            revoked: watch::Sender::new(None),
        }
    }

    /// The accept-time attestation, without checking the peer again.
    pub fn attested(&self) -> Option<&AttestedPeer> {
        self.attested.as_ref().ok()
    }

    /// Why the connection serves nothing, if that is already known (its attestation
    /// failed, or its process was seen gone or changed), without reading /proc.
    pub fn known_refusal(&self) -> Option<PeerRefusal> {
        if let Some(r) = self.revoked.borrow().clone() {
            return Some(r);
        }
        self.attested.as_ref().err().cloned()
    }

    /// Checks now that the connection's process still is the one that connected, and
    /// returns its attestation if so (see [`ConnectionPeer::verify`] for what it reads).
    pub fn current(&self) -> Result<&AttestedPeer, PeerRefusal> {
        if let Some(r) = self.revoked.borrow().clone() {
            return Err(r);
        }
        let attested = self.attested.as_ref().map_err(Clone::clone)?;
        if let Err(r) = attested.process.check() {
            if self.revoke(r.clone()) {
                super::metrics::workload_connection_refused(r.label());
            }
            return Err(r);
        }
        Ok(attested)
    }

    /// [`ConnectionPeer::current`], on the calling thread: the check polls the pidfd,
    /// reads `/proc/<pid>/status` (and `stat` without a pidfd) and `statx`es the
    /// executable without asking its filesystem, none of which can wait on the peer,
    /// so it runs inline instead of paying two thread hops (p50 90 µs against 36 µs
    /// for a new process's first answer here; docs/performance.md).
    pub async fn verify(self: &Arc<Self>) -> Result<(), PeerRefusal> {
        self.current().map(|_| ())
    }

    /// Watches for the peer's revocation (exit or exec); `Some(reason)` once revoked.
    pub fn revocation(&self) -> watch::Receiver<Option<PeerRefusal>> {
        self.revoked.subscribe()
    }

    /// Marks the peer as gone or changed, for good; true if it was not already.
    fn revoke(&self, reason: PeerRefusal) -> bool {
        self.revoked.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason);
                true
            } else {
                false
            }
        })
    }
}

/// Open connections, in total and per uid, against the caps.
struct Gate {
    max_connections: usize,
    others_max_connections: usize,
    open: Mutex<OpenConnections>,
    freed: Notify,
}

#[derive(Default)]
struct OpenConnections {
    total: usize,
    per_uid: HashMap<u32, usize>,
    /// What each connection is doing, to choose one to close when the cap is reached.
    tracked: HashMap<u64, Tracked>,
    next_id: u64,
}

/// What the gate knows of an open connection.
struct Tracked {
    accepted: tokio::time::Instant,
    /// Requests in progress (0: idle).
    requests: watch::Receiver<usize>,
    /// Whether it ever made a request.
    used: Arc<std::sync::atomic::AtomicBool>,
    /// Asks the connection to close.
    evict: Arc<Notify>,
}

/// One admitted connection; frees its place when dropped.
struct Slot {
    gate: Arc<Gate>,
    uid: u32,
    id: u64,
}

impl Slot {
    /// Lets the gate close this connection for room while it has no request in progress.
    fn track(&self, tracked: Tracked) {
        if let Ok(mut open) = self.gate.open.lock() {
            open.tracked.insert(self.id, tracked);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.gate.open.lock() {
            open.tracked.remove(&self.id);
            open.total = open.total.saturating_sub(1);
            if let Some(n) = open.per_uid.get_mut(&self.uid) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.per_uid.remove(&self.uid);
                }
            }
        }
        super::metrics::workload_connections_open(-1);
        self.gate.freed.notify_waiters();
    }
}

/// `max` when `max + others` fits `budget`; else `max`'s share of `budget` in proportion
/// (at least 1), so the shares together never exceed it.
fn shared_cap(max: usize, others: usize, budget: usize) -> usize {
    let total = max.saturating_add(others);
    if total <= budget {
        return max.max(1);
    }
    let share = (budget as u128).saturating_mul(max as u128) / (total as u128).max(1);
    usize::try_from(share).unwrap_or(max).max(1)
}

/// Connections the descriptor limit leaves room for, read now (it can be changed on a
/// running process with `prlimit`).
fn descriptor_budget() -> usize {
    match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) => {
            usize::try_from(soft.saturating_sub(RESERVED_DESCRIPTORS) / DESCRIPTORS_PER_CONNECTION)
                .unwrap_or(usize::MAX)
        }
        Err(_) => usize::MAX,
    }
}

impl Gate {
    fn new(max_connections: usize, others_max_connections: usize) -> Self {
        Self {
            max_connections,
            others_max_connections,
            open: Mutex::new(OpenConnections::default()),
            freed: Notify::new(),
        }
    }

    /// The connection cap right now: the configured one, or its share of what the
    /// descriptor limit leaves room for when this socket's and the others' caps together
    /// exceed it.
    fn cap(&self) -> usize {
        shared_cap(
            self.max_connections,
            self.others_max_connections,
            descriptor_budget(),
        )
    }

    fn total(&self) -> usize {
        self.open.lock().map(|o| o.total).unwrap_or(usize::MAX)
    }

    /// Waits until a connection may be accepted: below the cap, or at it with a
    /// connection that can be closed to make room ([`Gate::make_room`]). When every one
    /// has a request in progress, new connections wait in the backlog.
    async fn room(&self) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.total() < self.cap() || self.evictable() {
                return;
            }
            // Also wake up now and then: the descriptor limit may have been raised, or a
            // connection may have gone idle.
            let _ = tokio::time::timeout(Duration::from_secs(1), freed).await;
        }
    }

    /// Whether some connection could be closed for room.
    fn evictable(&self) -> bool {
        self.open.lock().is_ok_and(|open| {
            open.tracked.values().any(|t| {
                !t.used.load(std::sync::atomic::Ordering::Relaxed) || *t.requests.borrow() == 0
            })
        })
    }

    /// Called once a new connection is admitted: over the cap, asks the connection doing
    /// least to close, so the new one is served at once. Only admitted connections make
    /// room, so a uid over its share cannot push others out.
    fn make_room(&self) {
        if self.total() > self.cap() {
            self.evict_one();
        }
    }

    /// Asks the connection doing least to close: one that never made a request, else an
    /// idle one, oldest first; never one with a request in progress (an open stream).
    /// False if there is none.
    fn evict_one(&self) -> bool {
        let Ok(mut open) = self.open.lock() else {
            return false;
        };
        let oldest = |pred: &dyn Fn(&Tracked) -> bool| {
            open.tracked
                .iter()
                .filter(|(_, t)| pred(t))
                .min_by_key(|(_, t)| t.accepted)
                .map(|(id, _)| *id)
        };
        let pick = oldest(&|t| !t.used.load(std::sync::atomic::Ordering::Relaxed))
            .or_else(|| oldest(&|t| *t.requests.borrow() == 0));
        // Asked once: no longer a candidate, even if it turns busy and stays.
        match pick.and_then(|id| open.tracked.remove(&id)) {
            Some(t) => {
                t.evict.notify_one();
                true
            }
            None => false,
        }
    }

    /// Waits until every connection has closed.
    async fn drained(&self) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.total() == 0 {
                return;
            }
            freed.await;
        }
    }

    /// Admits a connection from `uid`, or says the per-uid cap it hit.
    fn admit(self: &Arc<Self>, uid: u32) -> Result<Slot, usize> {
        let per_uid_cap = (self.cap() / 2).max(1);
        let mut open = self.open.lock().map_err(|_| 0usize)?;
        let mine = open.per_uid.get(&uid).copied().unwrap_or(0);
        if mine >= per_uid_cap {
            return Err(per_uid_cap);
        }
        open.total += 1;
        open.per_uid.insert(uid, mine + 1);
        open.next_id += 1;
        let id = open.next_id;
        drop(open);
        super::metrics::workload_connections_open(1);
        Ok(Slot {
            gate: self.clone(),
            uid,
            id,
        })
    }
}

/// Logs a warning at most once a second, counting what it held back.
struct Throttled {
    last: Mutex<Option<(tokio::time::Instant, u64)>>,
}

impl Throttled {
    const fn new() -> Self {
        Self {
            last: Mutex::new(None),
        }
    }

    /// Runs `log(held_back)` unless it ran less than a second ago.
    fn log(&self, log: impl FnOnce(u64)) {
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        let now = tokio::time::Instant::now();
        match &mut *last {
            Some((at, held)) if now.duration_since(*at) < Duration::from_secs(1) => *held += 1,
            _ => {
                let held = last.map(|(_, h)| h).unwrap_or(0);
                *last = Some((now, 0));
                drop(last);
                log(held);
            }
        }
    }
}

static ACCEPT_ERRORS: Throttled = Throttled::new();
static UID_LIMIT: Throttled = Throttled::new();

/// A request in progress; the connection is not idle while one exists.
struct InFlight(Arc<watch::Sender<usize>>);

impl InFlight {
    fn begin(requests: &Arc<watch::Sender<usize>>) -> Self {
        requests.send_modify(|n| *n += 1);
        Self(requests.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A request's place in the count of requests in progress: taken once its message has
/// fully arrived ([`RequestBody`]), held until its response ends ([`InFlightBody`]).
#[derive(Clone, Default)]
struct RequestInFlight(Arc<Mutex<Option<InFlight>>>);

/// A request body that counts its request as in progress only once the body has fully
/// arrived. Until then the agent only waits on the client, which must neither keep the
/// connection from idling out nor from being closed for room: a client sending headers
/// and never the message would otherwise hold its connection as busy, 30 s at a time.
pub struct RequestBody {
    body: Incoming,
    /// `None` for requests that are not counted (health checks), or once counted.
    start: Option<RequestStart>,
    /// Counted at its first data frame, not at its end (a bidirectional stream).
    bidi: bool,
}

struct RequestStart {
    requests: Arc<watch::Sender<usize>>,
    used: Arc<std::sync::atomic::AtomicBool>,
    in_flight: RequestInFlight,
}

impl RequestStart {
    fn begin(self) {
        self.used.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut slot) = self.in_flight.0.lock() {
            *slot = Some(InFlight::begin(&self.requests));
        }
    }
}

impl Body for RequestBody {
    type Data = <Incoming as Body>::Data;
    type Error = <Incoming as Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        let complete = match &frame {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(f))) => this.body.is_end_stream() || (this.bidi && f.is_data()),
            _ => false,
        };
        if complete {
            if let Some(start) = this.start.take() {
                start.begin();
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A response body that keeps its request counted as in progress until it ends (a
/// server stream is in progress for as long as it is open).
struct InFlightBody<B> {
    body: B,
    _in_flight: RequestInFlight,
}

impl<B: Body + Unpin> Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Waits until no request has been in progress for `limit`.
async fn idle_for(mut requests: watch::Receiver<usize>, limit: Duration) {
    loop {
        if requests.wait_for(|n| *n == 0).await.is_err() {
            return std::future::pending().await;
        }
        match tokio::time::timeout(limit, requests.changed()).await {
            Err(_) => return,
            Ok(Ok(())) => continue,
            Ok(Err(_)) => return std::future::pending().await,
        }
    }
}

/// Resolves when the connection's peer is seen to have exited or exec'd. Only needed
/// while requests are in progress (every new request checks the peer itself), so it checks
/// every [`RECHECK_INTERVAL`] while one is; never for a connection refused at accept.
async fn peer_change(
    peer: Arc<ConnectionPeer>,
    mut requests: watch::Receiver<usize>,
) -> PeerRefusal {
    if peer.attested().is_none() {
        return std::future::pending().await;
    }
    loop {
        if requests.wait_for(|n| *n > 0).await.is_err() {
            return std::future::pending().await;
        }
        tokio::time::sleep(RECHECK_INTERVAL).await;
        if let Err(r) = peer.verify().await {
            return r;
        }
    }
}

/// Everything connection tasks share.
struct Shared<S> {
    service: S,
    limits: Limits,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    attestations: Arc<Semaphore>,
    /// Each uid's share of `attestations`.
    attestations_per_uid: Mutex<HashMap<u32, Arc<Semaphore>>>,
    require_pidfd: bool,
}

impl<S> Shared<S> {
    /// The semaphore bounding `uid`'s attestations; the map keeps only uids with one in
    /// progress or waiting, so it is bounded by the connections.
    fn attestation_share(&self, uid: u32) -> Arc<Semaphore> {
        let Ok(mut shares) = self.attestations_per_uid.lock() else {
            return Arc::new(Semaphore::new(MAX_CONCURRENT_ATTESTATIONS_PER_UID));
        };
        shares.retain(|_, s| Arc::strong_count(s) > 1);
        shares
            .entry(uid)
            .or_insert_with(|| Arc::new(Semaphore::new(MAX_CONCURRENT_ATTESTATIONS_PER_UID)))
            .clone()
    }
}

/// The Workload API's gRPC routes, as this listener serves them on each connection.
pub trait WorkloadRoutes:
    tower::Service<
        http::Request<RequestBody>,
        Response = http::Response<tonic::body::Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> WorkloadRoutes for S where
    S: tower::Service<
            http::Request<RequestBody>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// [`serve`] on a thread of its own with a single-threaded runtime; resolves when that
/// ends.
///
/// Why a thread of its own: a Workload API call is answered from memory in tens of
/// microseconds, while every hand-off between threads on the way (the accepting thread,
/// the worker that owns the connection, the one that runs the call) is a wake-up of
/// another CPU, about 30 µs each on a virtual machine (a cross-CPU socket round trip
/// measured 59 µs here against 5 µs on one CPU). On one thread a call costs one wake-up,
/// the client's. The agent's other work (syncs, renewals, TPM commands, refilling the
/// SVID pool) stays on the multi-threaded runtime and never holds this one up; blocking
/// work of a call (reading /proc, hashing an executable) still goes to a blocking thread.
pub async fn serve_on_own_thread<S>(
    listener: UnixListener,
    service: S,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    S: WorkloadRoutes,
{
    // The listener moves to the new runtime's reactor; the shutdown is watched here, so
    // signals stay with the main runtime.
    let listener = listener.into_std()?;
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let watcher = tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<std::io::Result<()>>();
    std::thread::Builder::new()
        .name("workload-api".into())
        .spawn(move || {
            let served = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                // Its blocking threads (reading /proc, hashing) answer workloads too.
                .thread_name("workload-api")
                .build()
                .and_then(|rt| {
                    rt.block_on(async move {
                        let listener = UnixListener::from_std(listener)?;
                        let stop = async move {
                            let _ = stop_rx.wait_for(|s| *s).await;
                        };
                        serve(listener, service, limits, stop).await;
                        Ok(())
                    })
                });
            let _ = done_tx.send(served);
        })?;
    let served = done_rx
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("the Workload API thread panicked")));
    watcher.abort();
    served
}

/// Serves the Workload API on `listener` until `shutdown` resolves, then closes the
/// connections gracefully (bounded by [`CLOSE_GRACE`]).
pub async fn serve<S>(
    listener: UnixListener,
    service: S,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) where
    S: WorkloadRoutes,
{
    let require_pidfd = peer_pidfd_supported();
    if require_pidfd {
        tracing::info!("Workload API connections are bound to their process by SO_PEERPIDFD");
    } else {
        tracing::warn!(
            "this kernel has no SO_PEERPIDFD (Linux 6.5+): Workload API connections are bound \
             by pid and start time read at accept, which cannot see a pid reused before that"
        );
    }
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    let shared = Arc::new(Shared {
        service,
        limits,
        http2,
        attestations: Arc::new(Semaphore::new(MAX_CONCURRENT_ATTESTATIONS)),
        attestations_per_uid: Mutex::new(HashMap::new()),
        require_pidfd,
    });
    let gate = Arc::new(Gate::new(
        limits.max_connections,
        limits.others_max_connections,
    ));
    tracing::info!(
        max_connections = gate.cap(),
        idle_timeout_seconds = limits.idle_timeout.as_secs(),
        "Workload API connection limits"
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            r = async {
                gate.room().await;
                listener.accept().await
            } => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and the like: the connection stays in the backlog; do not spin.
                super::metrics::workload_connection_refused("accept_failed");
                ACCEPT_ERRORS.log(|held| {
                    tracing::warn!(error = %e, held_back = held, "cannot accept a Workload API connection")
                });
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let at_connect = match ConnectTimePeer::of(stream.as_fd()) {
            Ok(p) => p,
            Err(r) => {
                tracing::warn!(reason = %r, "closing a Workload API connection without peer credentials");
                continue;
            }
        };
        let slot = match gate.admit(at_connect.uid) {
            Ok(slot) => {
                gate.make_room();
                slot
            }
            Err(per_uid_cap) => {
                super::metrics::workload_connection_refused("uid_connection_limit");
                let (uid, pid) = (at_connect.uid, at_connect.pid);
                UID_LIMIT.log(|held| {
                    tracing::warn!(
                        event = "workload_connection_refused",
                        uid,
                        pid,
                        per_uid_cap,
                        held_back = held,
                        "too many Workload API connections from this uid; closing the new one"
                    )
                });
                continue;
            }
        };
        tokio::spawn(serve_connection(
            stream,
            at_connect,
            slot,
            shared.clone(),
            stop_rx.clone(),
        ));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let open = gate.total();
    if open > 0 {
        tracing::info!(
            open,
            "closing Workload API connections (at most {} s)",
            CLOSE_GRACE.as_secs()
        );
    }
    let _ = tokio::time::timeout(CLOSE_GRACE + Duration::from_secs(1), gate.drained()).await;
}

/// Binds a connection to its peer at accept: attests it, bounded in time and concurrency.
async fn bind_peer<S>(at_connect: ConnectTimePeer, shared: &Shared<S>) -> ConnectionPeer {
    let (pid, uid) = (at_connect.pid, at_connect.uid);
    let require_pidfd = shared.require_pidfd;
    let attestations = shared.attestations.clone();
    let share = shared.attestation_share(uid);
    let attested = tokio::time::timeout(ATTESTATION_TIMEOUT, async move {
        let stopping = |_| PeerRefusal::Unattestable("the agent is stopping".into());
        // The uid's share first, so a uid waiting on its own share holds no common slot.
        let share = share.acquire_owned().await.map_err(stopping)?;
        let _common = attestations.acquire_owned().await.map_err(stopping)?;
        // Reads /proc and may hash an executable: off the async workers. The uid's share
        // is held until that work really ends, the common slot only until this wait does
        // (at the timeout at the latest): work stuck in the kernel (a file system that
        // does not answer, which the attestation avoids opening) holds only its own uid's
        // share, never the slots of every other uid.
        tokio::task::spawn_blocking(move || {
            let _share = share;
            attest_peer(at_connect, require_pidfd)
        })
        .await
        .map_err(|e| PeerRefusal::Unattestable(format!("attestation failed to run: {e}")))?
    })
    .await
    .unwrap_or_else(|_| {
        Err(PeerRefusal::Unattestable(format!(
            "attestation took longer than {} s",
            ATTESTATION_TIMEOUT.as_secs()
        )))
    });
    match &attested {
        Ok(a) => tracing::debug!(
            pid = a.process.instance.pid,
            uid,
            start_time = a.process.instance.start_time,
            by_pidfd = a.process.pidfd().is_some(),
            "Workload API connection bound to its process"
        ),
        Err(r) => {
            super::metrics::workload_connection_refused(r.label());
            if let Some(suppressed) = crate::refusal_log::admit(uid, "workload_connection_refused")
            {
                tracing::info!(
                    event = "workload_connection_refused",
                    pid,
                    uid,
                    reason = %r,
                    suppressed,
                    "Workload API connection not bound; its requests will be refused"
                )
            }
        }
    }
    ConnectionPeer::new(pid, uid, attested)
}

/// Serves one connection: HTTP/2 with its peer in every request, until the client leaves,
/// it stays idle too long, or the agent stops.
async fn serve_connection<S>(
    stream: UnixStream,
    at_connect: ConnectTimePeer,
    slot: Slot,
    shared: Arc<Shared<S>>,
    mut stop: watch::Receiver<bool>,
) where
    S: WorkloadRoutes,
{
    let requests = Arc::new(watch::Sender::new(0usize));
    let used = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let evict = Arc::new(Notify::new());
    slot.track(Tracked {
        accepted: tokio::time::Instant::now(),
        requests: requests.subscribe(),
        used: used.clone(),
        evict: evict.clone(),
    });
    let _slot = slot;
    let peer = Arc::new(bind_peer(at_connect, &shared).await);
    let idle = idle_for(requests.subscribe(), shared.limits.idle_timeout);
    let service = {
        let peer = peer.clone();
        let requests = requests.clone();
        let used = used.clone();
        let inner = shared.service.clone();
        hyper::service::service_fn(move |req: http::Request<Incoming>| {
            let in_flight = RequestInFlight::default();
            // Health checks keep no connection open.
            let counted = !req.uri().path().starts_with("/grpc.health.v1.Health/");
            let start = counted.then(|| RequestStart {
                requests: requests.clone(),
                used: used.clone(),
                in_flight: in_flight.clone(),
            });
            // A bidirectional stream (Envoy's SDS) never ends its body: it is in
            // progress once its first message has arrived.
            let bidi = req.uri().path() == crate::sds::STREAM_SECRETS_PATH;
            let mut req = req.map(|body| RequestBody { body, start, bidi });
            req.extensions_mut().insert(peer.clone());
            let mut inner = inner.clone();
            async move {
                let answer = tokio::time::timeout(RESPONSE_TIMEOUT, async {
                    std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
                    inner.call(req).await
                })
                .await;
                let response = match answer {
                    Ok(Ok(r)) => r,
                    Ok(Err(never)) => match never {},
                    Err(_) => tonic::Status::deadline_exceeded(format!(
                        "the agent did not answer within {} s",
                        RESPONSE_TIMEOUT.as_secs()
                    ))
                    .into_http(),
                };
                Ok::<_, Infallible>(response.map(|body| InFlightBody {
                    body,
                    _in_flight: in_flight,
                }))
            }
        })
    };
    let conn = shared.http2.serve_connection(
        TokioIo::new(AuthorityFixingStream::with_limits(
            stream,
            // The adapter buffers a header block whole before h2 sees it: held to h2's
            // own bound, an unfinished block holds kilobytes, not megabytes.
            ztid_h2_authority::Limits::for_header_list(MAX_HEADER_LIST_BYTES as usize),
        )),
        service,
    );
    let change = peer_change(peer.clone(), requests.subscribe());
    let force_close = tokio::time::sleep(Duration::from_secs(365 * 24 * 3600));
    tokio::pin!(conn, idle, change, force_close);
    let (mut closing, mut followed) = (false, false);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "Workload API connection ended with an error");
                }
                break;
            }
            _ = &mut idle, if !closing => {
                tracing::debug!(pid = ?peer.pid, uid = peer.uid, "closing an idle Workload API connection");
                super::metrics::workload_connection_idle_closed();
                if !used.load(std::sync::atomic::Ordering::Relaxed) {
                    // Never a request (maybe never even a preface): nothing to finish,
                    // and such a client would not answer a GOAWAY either.
                    break;
                }
                conn.as_mut().graceful_shutdown();
                closing = true;
                force_close.as_mut().reset(tokio::time::Instant::now() + CLOSE_GRACE);
            }
            _ = evict.notified(), if !closing => {
                if *requests.borrow() > 0 {
                    // Busy since it was chosen: it stays, the gate asks another.
                    continue;
                }
                tracing::debug!(pid = ?peer.pid, uid = peer.uid, "closing a Workload API connection doing nothing, to make room");
                super::metrics::workload_connection_idle_closed();
                break;
            }
            _ = stop.wait_for(|s| *s), if !closing => {
                if !used.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                conn.as_mut().graceful_shutdown();
                closing = true;
                force_close.as_mut().reset(tokio::time::Instant::now() + CLOSE_GRACE);
            }
            reason = &mut change, if !followed => {
                followed = true;
                if peer.revoke(reason.clone()) {
                    super::metrics::workload_connection_refused(reason.label());
                }
                // Open streams end by themselves (they watch the revocation); later
                // requests are refused with the reason until the connection idles out.
                tracing::info!(
                    event = "workload_connection_revoked",
                    pid = ?peer.pid,
                    uid = peer.uid,
                    reason = %reason,
                    "Workload API connection no longer serves anything"
                );
            }
            _ = &mut force_close, if closing => {
                tracing::debug!(pid = ?peer.pid, "Workload API connection did not close in time; dropping it");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_uid_gets_half_the_cap_and_slots_free_on_drop() {
        let gate = Arc::new(Gate::new(8, 0));
        assert_eq!(gate.cap(), 8.min(descriptor_budget()));
        let half = gate.cap() / 2;
        let mine: Vec<Slot> = (0..half)
            .map(|_| gate.admit(1000).expect("admitted"))
            .collect();
        assert_eq!(gate.admit(1000).err(), Some(half), "over the per-uid cap");
        let other = gate.admit(1001).expect("another uid still gets in");
        assert_eq!(gate.total(), half + 1);
        drop(mine);
        assert_eq!(gate.total(), 1);
        assert!(gate.admit(1000).is_ok(), "freed slots are reusable");
        drop(other);
    }

    fn track(slot: &Slot, used: bool, requests: usize) -> Arc<Notify> {
        let evict = Arc::new(Notify::new());
        slot.track(Tracked {
            accepted: tokio::time::Instant::now(),
            requests: watch::Sender::new(requests).subscribe(),
            used: Arc::new(std::sync::atomic::AtomicBool::new(used)),
            evict: evict.clone(),
        });
        evict
    }

    fn asked(evict: &Notify) -> bool {
        futures::FutureExt::now_or_never(evict.notified()).is_some()
    }

    #[test]
    fn room_is_made_by_closing_the_connection_doing_least() {
        let gate = Arc::new(Gate::new(8, 0));
        let mut slots: Vec<Slot> = (0..4).map(|uid| gate.admit(uid).expect("in")).collect();
        let busy = track(&slots[0], true, 1);
        let idle = track(&slots[1], true, 0);
        let unused_old = track(&slots[2], false, 0);
        let unused_new = track(&slots[3], false, 0);
        // Never used first, oldest first.
        assert!(gate.evict_one());
        assert!(asked(&unused_old) && !asked(&unused_new) && !asked(&idle));
        drop(slots.split_off(2));
        // Then idle; a request in progress is never closed for room.
        assert!(gate.evict_one());
        assert!(asked(&idle) && !asked(&busy));
        let gate2 = Arc::new(Gate::new(8, 0));
        let only_busy = gate2.admit(7).expect("in");
        let busy2 = track(&only_busy, true, 2);
        assert!(!gate2.evict_one(), "nothing to close");
        assert!(!asked(&busy2));
    }

    /// The header adapter in front of h2 buffers a header block whole: held to h2's 16 KiB,
    /// a client that sends a bigger block and stops is cut off at once, instead of holding a
    /// megabyte of the agent's memory per connection until the idle timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unfinished_header_block_past_the_header_bound_closes_the_connection() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (_reporter, health) = tonic_health::server::health_reporter();
        tokio::spawn(serve(
            listener,
            tonic::service::Routes::new(health),
            Limits::default(),
            std::future::pending(),
        ));
        fn frame(out: &mut Vec<u8>, kind: u8, stream: u32, payload: &[u8]) {
            let len = payload.len();
            out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, 0]);
            out.extend_from_slice(&stream.to_be_bytes());
            out.extend_from_slice(payload);
        }
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        frame(&mut bytes, 0x4, 0, &[]);
        // HEADERS without END_HEADERS, then a CONTINUATION past 16 KiB, never ended.
        frame(&mut bytes, 0x1, 1, &[0; 16_000]);
        frame(&mut bytes, 0x9, 1, &[0; 16_000]);
        let mut conn = UnixStream::connect(&path).await.unwrap();
        // The agent may close before it has read everything: a failed write is expected.
        let _ = conn.write_all(&bytes).await;
        let mut answer = Vec::new();
        let closed =
            tokio::time::timeout(DEFAULT_IDLE_TIMEOUT / 2, conn.read_to_end(&mut answer)).await;
        assert!(closed.is_ok(), "the connection was still open");
    }

    #[test]
    fn sockets_share_the_descriptors_in_proportion_to_their_caps() {
        assert_eq!(shared_cap(1024, 64, 10_000), 1024, "room for both");
        assert_eq!(shared_cap(64, 1024, 10_000), 64);
        // 896 descriptors' worth of connections for caps of 1,024 and 64.
        let (w, d) = (shared_cap(1024, 64, 896), shared_cap(64, 1024, 896));
        assert!(w + d <= 896, "{w} + {d}");
        assert_eq!((w, d), (843, 52));
        assert_eq!(shared_cap(4, 1_000_000, 100), 1, "never below one");
        let gate = Gate::new(usize::MAX / 2, usize::MAX / 2);
        let budget = descriptor_budget();
        assert!(gate.cap() <= budget / 2 + 1, "{} of {budget}", gate.cap());
    }

    #[test]
    fn the_descriptor_limit_lowers_the_cap() {
        let budget = descriptor_budget();
        let gate = Gate::new(usize::MAX, 0);
        assert_eq!(gate.cap(), budget.max(1));
        if let Ok((soft, _)) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        {
            if soft != nix::sys::resource::RLIM_INFINITY {
                assert_eq!(
                    budget as u64,
                    soft.saturating_sub(RESERVED_DESCRIPTORS) / DESCRIPTORS_PER_CONNECTION
                );
            }
        }
    }
}
