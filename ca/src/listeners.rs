//! Connection limits of every server listener: timeouts and a connection cap, so that
//! clients that connect and then stall or trickle cannot hold descriptors, and so that
//! a flood on one listener leaves descriptors for the others, the admin socket and the
//! audit writer. The README's "Limits" section says which limit applies where.
//!
//! Every accepted connection is registered with its [`Listener`] and wrapped in a
//! [`Guarded`] stream, which fails (closing the connection) once the connection passes
//! its deadline:
//!
//! - no request yet: the request header timeout, from acceptance (TLS handshake, HTTP/2
//!   preface and the first request head all within it; the TLS handshake also within
//!   its own timeout);
//! - no request in flight: the idle timeout, from the end of the last request (HTTP/1
//!   listeners: the header timeout, which hyper also applies to every request head, so
//!   a header line every few seconds does not keep a connection);
//! - a request in flight longer than the request timeout (including a client that does
//!   not read its answer).
//!
//! At its cap a listener makes room for a new connection by closing the one that is
//! doing least: first one that has sent no request yet, then an idle one, then an
//! unauthenticated one with a request in flight (oldest first); connections of
//! authenticated clients with a request in flight are never closed for room. When
//! nothing can be closed the new connection is closed at once. The TCP listeners share
//! the process's descriptors, less [`RESERVED_DESCRIPTORS`]: their caps shrink in
//! proportion when the descriptor limit (read at every accept) is lower than their
//! sum, so `prlimit` on a running server takes effect at once.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::task::AtomicWaker;
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::time::Sleep;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};

use crate::grpc_middleware::{Checked, GrpcResponse, PerRequest, ResponseFuture};
use crate::limits::{LimitsConfig, RESERVED_DESCRIPTORS, SHUTDOWN_GRACE};

/// Connections over a cap that may still be closing (their descriptors not yet
/// released) before new ones are refused outright.
const CLOSING_SLACK: usize = 16;
/// Smallest cap a listener is shrunk to under a low descriptor limit.
const MIN_CAP: usize = 4;
/// How often a listener logs how many connections it closed.
const CLOSE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The timeouts of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TLS handshake.
    pub handshake: Duration,
    /// From acceptance to the first request head.
    pub header: Duration,
    /// No request in flight.
    pub idle: Duration,
    /// One request in flight.
    pub request: Duration,
}

impl Timeouts {
    /// gRPC listeners (HTTP/2: node API, admin socket, remote admin).
    pub fn grpc(l: &LimitsConfig) -> Self {
        Self {
            handshake: l.tls_handshake_timeout(),
            header: l.request_header_timeout(),
            idle: l.idle_timeout(),
            request: l.request_timeout(),
        }
    }

    /// HTTP/1 listeners (bundle endpoint, OIDC): idle connections get the header timeout.
    pub fn http1(l: &LimitsConfig) -> Self {
        Self {
            idle: l.request_header_timeout(),
            ..Self::grpc(l)
        }
    }
}

/// The TCP listeners' share of the process's descriptors.
#[derive(Default)]
pub struct DescriptorBudget {
    caps: Mutex<Vec<(&'static str, usize)>>,
}

impl DescriptorBudget {
    fn register(&self, name: &'static str, cap: usize) {
        if let Ok(mut c) = self.caps.lock() {
            c.push((name, cap));
        }
    }

    /// `cap` shrunk in proportion when the listeners' caps together exceed the
    /// descriptors available.
    fn effective(&self, cap: usize) -> usize {
        let available = nofile_soft_limit().saturating_sub(RESERVED_DESCRIPTORS) as usize;
        let sum: usize = self
            .caps
            .lock()
            .map(|c| c.iter().map(|(_, n)| n).sum())
            .unwrap_or(cap);
        if sum <= available {
            cap
        } else {
            (cap.saturating_mul(available) / sum.max(1)).max(MIN_CAP)
        }
    }
}

/// The soft `RLIMIT_NOFILE` now.
pub fn nofile_soft_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024)
}

/// Raises the soft descriptor limit to the hard one (as Go programs do), so the caps
/// have the room the operator allowed.
pub fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, hard, "could not raise the descriptor limit");
            }
        }
    }
}

#[derive(Default)]
struct Counters {
    refused_at_cap: u64,
    evicted: u64,
    timed_out: u64,
}

/// One listener: its limits and its open connections.
pub struct Listener {
    name: &'static str,
    cap: usize,
    timeouts: Timeouts,
    budget: Option<Arc<DescriptorBudget>>,
    conns: Mutex<Registry>,
    next_id: AtomicU64,
    shutdown_at: Mutex<Option<Instant>>,
    counters: Mutex<(Counters, Instant)>,
    /// Signalled whenever a connection's descriptor is released.
    released: tokio::sync::Notify,
}

enum Admission {
    Admitted(ConnHandle),
    /// At the cap, and nothing may be closed for room.
    Full,
    /// At the cap, and too many connections are still closing.
    Closing,
}

#[derive(Default)]
struct Registry {
    by_id: HashMap<u64, Arc<ConnState>>,
    by_addr: HashMap<SocketAddr, u64>,
}

impl Listener {
    /// A listener named `name` (for logs) holding at most `cap` connections; TCP
    /// listeners pass the shared descriptor `budget`.
    pub fn new(
        name: &'static str,
        cap: usize,
        timeouts: Timeouts,
        budget: Option<Arc<DescriptorBudget>>,
    ) -> Arc<Self> {
        if let Some(b) = &budget {
            b.register(name, cap);
        }
        Arc::new(Self {
            name,
            cap,
            timeouts,
            budget,
            conns: Mutex::new(Registry::default()),
            next_id: AtomicU64::new(1),
            shutdown_at: Mutex::new(None),
            counters: Mutex::new((Counters::default(), Instant::now())),
            released: tokio::sync::Notify::new(),
        })
    }

    /// The listener's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Its timeouts.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// The cap in effect now.
    pub fn effective_cap(&self) -> usize {
        match &self.budget {
            Some(b) => b.effective(self.cap).min(self.cap),
            None => self.cap,
        }
    }

    /// Connections open now (closing ones included).
    pub fn open_connections(&self) -> usize {
        self.conns.lock().map(|r| r.by_id.len()).unwrap_or(0)
    }

    /// Registers a new connection from `peer`, making room if the listener is at its
    /// cap; `None` when there is no room (the caller closes the connection). When the
    /// connections closed to make room have not released their descriptors yet, waits a
    /// little for them (the accept loop pauses; new clients wait in the backlog).
    pub async fn admit(
        self: &Arc<Self>,
        peer: String,
        addr: Option<SocketAddr>,
        authenticated: bool,
    ) -> Option<ConnHandle> {
        for _ in 0..20 {
            let released = self.released.notified();
            match self.try_admit(&peer, addr, authenticated) {
                Admission::Admitted(c) => return Some(c),
                Admission::Full => break,
                Admission::Closing => {
                    let _ = tokio::time::timeout(Duration::from_millis(25), released).await;
                }
            }
        }
        self.count(|c| c.refused_at_cap += 1);
        None
    }

    /// [`Listener::admit`] without waiting for closing connections: `None` at once when
    /// there is no room (for clients that must never hold up the accept loop).
    pub fn admit_now(
        self: &Arc<Self>,
        peer: String,
        addr: Option<SocketAddr>,
        authenticated: bool,
    ) -> Option<ConnHandle> {
        match self.try_admit(&peer, addr, authenticated) {
            Admission::Admitted(c) => Some(c),
            Admission::Full | Admission::Closing => {
                self.count(|c| c.refused_at_cap += 1);
                None
            }
        }
    }

    fn try_admit(
        self: &Arc<Self>,
        peer: &str,
        addr: Option<SocketAddr>,
        authenticated: bool,
    ) -> Admission {
        let cap = self.effective_cap();
        let Ok(mut reg) = self.conns.lock() else {
            return Admission::Full;
        };
        let live = reg.by_id.values().filter(|c| !c.is_closing()).count();
        if live >= cap {
            if reg.by_id.len() >= cap + CLOSING_SLACK {
                return Admission::Closing;
            }
            let victim = reg
                .by_id
                .values()
                .filter(|c| !c.is_closing())
                .filter_map(|c| c.eviction_rank().map(|r| (r, c.clone())))
                .min_by_key(|(r, _)| *r)
                .map(|(_, c)| c);
            match victim {
                Some(v) => {
                    v.close("closed to make room for a new connection");
                    drop(reg);
                    self.count(|c| c.evicted += 1);
                    let Ok(r) = self.conns.lock() else {
                        return Admission::Full;
                    };
                    reg = r;
                }
                None => return Admission::Full,
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState {
            peer: peer.to_string(),
            opened: Instant::now(),
            authenticated: AtomicBool::new(authenticated),
            activity: Mutex::new(Activity {
                in_flight: BTreeMap::new(),
                next_request: 0,
                started: 0,
                idle_since: Instant::now(),
            }),
            closing: Mutex::new(None),
            closing_flag: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        reg.by_id.insert(id, state.clone());
        if let Some(a) = addr {
            reg.by_addr.insert(a, id);
        }
        Admission::Admitted(ConnHandle {
            listener: self.clone(),
            id,
            addr,
            state,
        })
    }

    fn remove(&self, id: u64, addr: Option<SocketAddr>) {
        if let Ok(mut reg) = self.conns.lock() {
            reg.by_id.remove(&id);
            if let Some(a) = addr {
                if reg.by_addr.get(&a) == Some(&id) {
                    reg.by_addr.remove(&a);
                }
            }
        }
        self.released.notify_waiters();
    }

    fn by_addr(&self, addr: SocketAddr) -> Option<Arc<ConnState>> {
        let reg = self.conns.lock().ok()?;
        reg.by_addr
            .get(&addr)
            .and_then(|id| reg.by_id.get(id))
            .cloned()
    }

    /// The connection a gRPC request arrived on; for the admin socket, also puts the
    /// kernel's peer credentials where the handlers look for them.
    fn conn_for(&self, ext: &mut http::Extensions) -> Option<Arc<ConnState>> {
        if let Some(t) = ext.remove::<Tracked<UdsConnectInfo>>() {
            ext.insert(t.info);
            return Some(t.conn);
        }
        let addr = ext
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.get_ref().remote_addr())
            .or_else(|| ext.get::<TcpConnectInfo>().and_then(|i| i.remote_addr()))?;
        self.by_addr(addr)
    }

    /// From now on every connection closes within [`SHUTDOWN_GRACE`].
    pub fn shutdown(&self) {
        if let Ok(mut s) = self.shutdown_at.lock() {
            s.get_or_insert_with(Instant::now);
        }
        if let Ok(reg) = self.conns.lock() {
            for c in reg.by_id.values() {
                c.waker.wake();
            }
        }
    }

    fn shutdown_deadline(&self) -> Option<Instant> {
        self.shutdown_at
            .lock()
            .ok()
            .and_then(|s| *s)
            .map(|t| t + SHUTDOWN_GRACE)
    }

    /// Counts a closed connection, and logs the counts at most every few seconds (a
    /// flood must not become a flood of log lines).
    fn count(&self, f: impl FnOnce(&mut Counters)) {
        let Ok(mut g) = self.counters.lock() else {
            return;
        };
        f(&mut g.0);
        if g.1.elapsed() >= CLOSE_LOG_INTERVAL {
            let c = std::mem::take(&mut g.0);
            g.1 = Instant::now();
            drop(g);
            tracing::warn!(
                event = "connections_closed",
                listener = self.name,
                refused_at_cap = c.refused_at_cap,
                closed_for_room = c.evicted,
                timed_out = c.timed_out,
                cap = self.effective_cap(),
                "listener closed connections that were over its cap or past a timeout"
            );
        }
    }
}

struct Activity {
    in_flight: BTreeMap<u64, Instant>,
    next_request: u64,
    started: u64,
    idle_since: Instant,
}

/// The state of one connection, shared by its stream and its requests.
pub struct ConnState {
    peer: String,
    opened: Instant,
    authenticated: AtomicBool,
    activity: Mutex<Activity>,
    closing: Mutex<Option<&'static str>>,
    closing_flag: AtomicBool,
    waker: AtomicWaker,
}

impl ConnState {
    /// The peer, for logs.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Marks the connection as authenticated (a verified client certificate).
    pub fn set_authenticated(&self) {
        self.authenticated.store(true, Ordering::Relaxed);
    }

    fn is_closing(&self) -> bool {
        self.closing_flag.load(Ordering::Relaxed)
    }

    /// Closes the connection at its next read or write, which this wakes.
    fn close(&self, why: &'static str) {
        if let Ok(mut c) = self.closing.lock() {
            c.get_or_insert(why);
        }
        self.closing_flag.store(true, Ordering::Relaxed);
        self.waker.wake();
    }

    fn closing_reason(&self) -> Option<&'static str> {
        if !self.is_closing() {
            return None;
        }
        self.closing.lock().ok().and_then(|c| *c)
    }

    /// A request has started; it is in flight until the guard is dropped (with the
    /// answer's body, for gRPC).
    pub fn request_started(self: &Arc<Self>) -> RequestGuard {
        let id = match self.activity.lock() {
            Ok(mut a) => {
                let id = a.next_request;
                a.next_request += 1;
                a.started += 1;
                a.in_flight.insert(id, Instant::now());
                id
            }
            Err(_) => 0,
        };
        self.waker.wake();
        RequestGuard {
            conn: self.clone(),
            id,
        }
    }

    /// When the connection must close, and why.
    fn deadline(&self, t: &Timeouts) -> (Instant, &'static str) {
        let Ok(a) = self.activity.lock() else {
            return (Instant::now(), "connection state unavailable");
        };
        if let Some(oldest) = a.in_flight.values().min() {
            (
                *oldest + t.request,
                "a request exceeded the request timeout",
            )
        } else if a.started == 0 {
            (
                self.opened + t.header,
                "no request within the request header timeout",
            )
        } else {
            (a.idle_since + t.idle, "idle past the idle timeout")
        }
    }

    /// Lower is closed first to make room; `None`: never closed for room.
    fn eviction_rank(&self) -> Option<(u8, Instant)> {
        let a = self.activity.lock().ok()?;
        if a.started == 0 {
            Some((0, self.opened))
        } else if a.in_flight.is_empty() {
            Some((1, a.idle_since))
        } else if !self.authenticated.load(Ordering::Relaxed) {
            Some((2, self.opened))
        } else {
            None
        }
    }
}

/// Keeps a request in flight on its connection until dropped.
pub struct RequestGuard {
    conn: Arc<ConnState>,
    id: u64,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if let Ok(mut a) = self.conn.activity.lock() {
            a.in_flight.remove(&self.id);
            if a.in_flight.is_empty() {
                a.idle_since = Instant::now();
            }
        }
        // The connection's deadline changed: let its stream re-arm the timer.
        self.conn.waker.wake();
    }
}

/// A registered connection; unregisters on drop.
pub struct ConnHandle {
    listener: Arc<Listener>,
    id: u64,
    addr: Option<SocketAddr>,
    state: Arc<ConnState>,
}

impl ConnHandle {
    /// The connection's state.
    pub fn state(&self) -> &Arc<ConnState> {
        &self.state
    }
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        self.listener.remove(self.id, self.addr);
    }
}

/// A connection's stream that fails every read and write once the connection is past
/// its deadline or closed for room, which makes the server drop it.
pub struct Guarded<IO> {
    io: IO,
    conn: ConnHandle,
    timer: Pin<Box<Sleep>>,
    armed_for: Option<Instant>,
}

impl<IO> Guarded<IO> {
    /// Guards `io` with the limits of its registered connection.
    pub fn new(io: IO, conn: ConnHandle) -> Self {
        Self {
            io,
            conn,
            timer: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
            armed_for: None,
        }
    }

    /// The connection's state.
    pub fn state(&self) -> &Arc<ConnState> {
        &self.conn.state
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let state = &self.conn.state;
        state.waker.register(cx.waker());
        if let Some(why) = state.closing_reason() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, why));
        }
        let listener = &self.conn.listener;
        let (mut deadline, mut why) = state.deadline(&listener.timeouts);
        if let Some(s) = listener.shutdown_deadline() {
            if s < deadline {
                (deadline, why) = (s, "the server is stopping");
            }
        }
        let expired = Instant::now() >= deadline || {
            if self.armed_for != Some(deadline) {
                self.timer
                    .as_mut()
                    .reset(tokio::time::Instant::from_std(deadline));
                self.armed_for = Some(deadline);
            }
            self.timer.as_mut().poll(cx).is_ready()
        };
        if expired {
            state.close(why);
            listener.count(|c| c.timed_out += 1);
            tracing::debug!(listener = listener.name, peer = %state.peer, reason = why, "connection closed");
            return Err(io::Error::new(io::ErrorKind::TimedOut, why));
        }
        Ok(())
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Under TLS the peer is found by its address ([`TcpConnectInfo`] stays what tonic's
/// handlers expect, so `peer_certs()` and `remote_addr()` work unchanged).
impl Connected for Guarded<TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// A connection's info with its state; [`TrackLayer`] puts the plain info back.
#[derive(Clone)]
pub struct Tracked<T> {
    info: T,
    conn: Arc<ConnState>,
}

impl Connected for Guarded<UnixStream> {
    type ConnectInfo = Tracked<UdsConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        Tracked {
            info: self.io.connect_info(),
            conn: self.conn.state.clone(),
        }
    }
}

/// Accepts TLS connections for a gRPC listener (node API, remote admin): each
/// handshake runs in its own task within the handshake timeout, so one slow or hostile
/// client cannot hold up the others.
pub fn tls_incoming(
    tcp: TcpListener,
    config: Arc<rustls::ServerConfig>,
    listener: Arc<Listener>,
) -> ReceiverStream<io::Result<TlsStream<Guarded<TcpStream>>>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let (stream, peer, conn) = accept_admitted(&tcp, &listener).await;
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = conn_tx.clone();
            let what = listener.name;
            let handshake = listener.timeouts.handshake;
            tokio::spawn(async move {
                let guarded = Guarded::new(stream, conn);
                match tokio::time::timeout(handshake, acceptor.accept(guarded)).await {
                    Ok(Ok(tls)) => {
                        if tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .is_some_and(|c| !c.is_empty())
                        {
                            tls.get_ref().0.state().set_authenticated();
                        }
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(event = "tls_refused", listener = what, %peer, error = %e, "TLS handshake failed")
                    }
                    Err(_) => {
                        tracing::debug!(event = "tls_refused", listener = what, %peer, "TLS handshake timed out")
                    }
                }
            });
        }
    });
    ReceiverStream::new(conn_rx)
}

/// Which uids a Unix socket admits into its listener. Connections of any other uid go
/// to `others`, a small listener of their own: they are still answered (and told why
/// they are refused), but never take, or make room in, the admitted uids' slots, so a
/// local uid that may reach the socket but not use it cannot lock the operator out.
pub struct UidGate {
    /// Whether a uid is admitted.
    pub admits: Box<dyn Fn(u32) -> bool + Send + Sync>,
    /// Where everyone else's connections are counted.
    pub others: Arc<Listener>,
}

/// Accepts connections on a Unix socket (the admin API).
pub fn unix_incoming(
    unix: UnixListener,
    listener: Arc<Listener>,
    gate: UidGate,
) -> ReceiverStream<io::Result<Guarded<UnixStream>>> {
    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let stream = match unix.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    accept_failed(listener.name, &e).await;
                    continue;
                }
            };
            let (peer, admitted) = match stream.peer_cred() {
                Ok(c) => (
                    format!("uid {} pid {}", c.uid(), c.pid().unwrap_or(0)),
                    (gate.admits)(c.uid()),
                ),
                Err(_) => ("unknown".into(), false),
            };
            // The kernel vouches for the uid, so an admitted one counts as authenticated.
            let conn = if admitted {
                listener.admit(peer, None, true).await
            } else {
                gate.others.admit_now(peer, None, false)
            };
            let Some(conn) = conn else {
                continue;
            };
            if conn_tx.send(Ok(Guarded::new(stream, conn))).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(conn_rx)
}

/// The next TCP connection `listener` admits (the ones it refuses are closed).
async fn accept_admitted(
    tcp: &TcpListener,
    listener: &Arc<Listener>,
) -> (TcpStream, SocketAddr, ConnHandle) {
    loop {
        let (stream, peer) = match tcp.accept().await {
            Ok(x) => x,
            Err(e) => {
                accept_failed(listener.name, &e).await;
                continue;
            }
        };
        if let Some(conn) = listener.admit(peer.to_string(), Some(peer), false).await {
            return (stream, peer, conn);
        }
    }
}

/// Accept errors (out of descriptors, most often) are retried after a pause instead of
/// spinning.
async fn accept_failed(what: &str, e: &io::Error) {
    tracing::warn!(listener = what, error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// The tower layer that counts each gRPC request as in flight on its connection until
/// its answer has been sent. Put it outermost.
#[derive(Clone)]
pub struct TrackLayer(pub Arc<Listener>);

impl<S> tower::Layer<S> for TrackLayer {
    type Service = Checked<Self, S>;
    fn layer(&self, inner: S) -> Self::Service {
        Checked::new(self.clone(), inner)
    }
}

impl PerRequest for TrackLayer {
    fn handle<S, B>(&self, mut ready: S, mut req: http::Request<B>) -> ResponseFuture<S::Error>
    where
        S: tower::Service<http::Request<B>, Response = GrpcResponse> + Send + 'static,
        S::Future: Send,
        B: Send + 'static,
    {
        // Counted here, synchronously, so the connection is busy before its stream is
        // read again.
        let guard = self
            .0
            .conn_for(req.extensions_mut())
            .map(|c| c.request_started());
        Box::pin(async move {
            let resp = ready.call(req).await?;
            Ok(match guard {
                Some(g) => resp.map(|body| {
                    tonic::body::Body::new(GuardedBody {
                        inner: body,
                        _guard: g,
                    })
                }),
                None => resp,
            })
        })
    }
}

/// A response body that keeps its request in flight until it is sent (or dropped).
struct GuardedBody {
    inner: tonic::body::Body,
    _guard: RequestGuard,
}

impl hyper::body::Body for GuardedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Serves an HTTP/1.1 listener (the bundle endpoint over TLS, OIDC discovery in the
/// clear) with `handler`, a synchronous function of the request.
pub fn serve_http1<H>(
    tcp: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    listener: Arc<Listener>,
    handler: H,
) where
    H: Fn(&http::Request<hyper::body::Incoming>) -> http::Response<Full<Bytes>>
        + Clone
        + Send
        + Sync
        + 'static,
{
    tokio::spawn(async move {
        loop {
            let (stream, peer, conn) = accept_admitted(&tcp, &listener).await;
            let handler = handler.clone();
            let tls = tls.clone();
            let timeouts = listener.timeouts;
            tokio::spawn(async move {
                let state = conn.state.clone();
                let guarded = Guarded::new(stream, conn);
                match tls {
                    None => serve_http1_conn(guarded, state, timeouts, handler).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(timeouts.handshake, acceptor.accept(guarded))
                            .await
                        {
                            Ok(Ok(tls)) => serve_http1_conn(tls, state, timeouts, handler).await,
                            _ => tracing::debug!(%peer, "bundle endpoint TLS handshake failed"),
                        }
                    }
                }
            });
        }
    });
}

async fn serve_http1_conn<IO, H>(io: IO, state: Arc<ConnState>, timeouts: Timeouts, handler: H)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(&http::Request<hyper::body::Incoming>) -> http::Response<Full<Bytes>>
        + Send
        + Sync
        + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let _in_flight = state.request_started();
        let resp = handler(&req);
        async move { Ok::<_, std::convert::Infallible>(resp) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header)
        .max_buf_size(crate::limits::MAX_HTTP1_HEAD_BYTES)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admit(l: &Arc<Listener>, peer: &str, authenticated: bool) -> Option<ConnHandle> {
        match l.try_admit(peer, None, authenticated) {
            Admission::Admitted(c) => Some(c),
            _ => None,
        }
    }

    fn timeouts() -> Timeouts {
        Timeouts {
            handshake: Duration::from_secs(10),
            header: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            request: Duration::from_secs(300),
        }
    }

    #[test]
    fn at_cap_the_least_busy_connection_makes_room() {
        let l = Listener::new("test", 3, timeouts(), None);
        let authed_busy = admit(&l, "a", true).unwrap();
        let _req = authed_busy.state().request_started();
        let idle = admit(&l, "b", false).unwrap();
        drop(idle.state().request_started());
        let fresh = admit(&l, "c", false).unwrap();
        // At the cap: the one that sent nothing goes first.
        let d = admit(&l, "d", false).unwrap();
        assert!(fresh.state().is_closing());
        assert!(!idle.state().is_closing() && !authed_busy.state().is_closing());
        drop(fresh);
        // Then an idle one, once nothing is left that sent nothing.
        let _d_req = d.state().request_started();
        d.state().set_authenticated();
        let _e = admit(&l, "e", false).unwrap();
        assert!(idle.state().is_closing());
        drop(idle);
        let _e_req = _e.state().request_started();
        _e.state().set_authenticated();
        // Authenticated clients' requests in flight are never closed for room.
        assert!(admit(&l, "f", false).is_none());
        assert!(!authed_busy.state().is_closing() && !d.state().is_closing());
    }

    #[test]
    fn deadlines_follow_activity() {
        let l = Listener::new("test", 3, timeouts(), None);
        let c = admit(&l, "a", false).unwrap();
        let (_, why) = c.state().deadline(&timeouts());
        assert_eq!(why, "no request within the request header timeout");
        let g = c.state().request_started();
        let (_, why) = c.state().deadline(&timeouts());
        assert_eq!(why, "a request exceeded the request timeout");
        drop(g);
        let (_, why) = c.state().deadline(&timeouts());
        assert_eq!(why, "idle past the idle timeout");
        drop(c);
        assert_eq!(l.open_connections(), 0);
    }

    #[test]
    fn over_the_slack_new_connections_are_refused() {
        let l = Listener::new("test", 1, timeouts(), None);
        let mut held = vec![admit(&l, "0", true).unwrap()];
        let _busy = held[0].state().request_started();
        // The only connection is busy and authenticated: nothing can make room.
        assert!(admit(&l, "x", false).is_none());
        drop(_busy);
        for i in 0..CLOSING_SLACK {
            held.push(admit(&l, &i.to_string(), false).unwrap());
        }
        assert!(admit(&l, "y", false).is_none());
    }
}
