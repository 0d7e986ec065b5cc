//! [`Listener`]: one listener's cap, timeouts and registry of open connections;
//! admission (making room at the cap by closing the connection doing least), shutdown,
//! and the rate-limited log of the connections it closed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};

use super::connection::{ConnHandle, ConnState};
use super::descriptors::DescriptorBudget;
use super::guarded_io::Tracked;
use super::timeouts::Timeouts;
use crate::limits::SHUTDOWN_GRACE;

/// Connections over a cap that may still be closing (their descriptors not yet
/// released) before new ones are refused outright.
pub(super) const CLOSING_SLACK: usize = 16;
/// How often a listener logs how many connections it closed.
const CLOSE_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Connections with a request in flight that one identity may hold beyond the reach of
/// eviction (see [`Immunity`]); its others may be closed to make room like anyone's.
pub const MAX_IMMUNE_PER_IDENTITY: usize = 4;

/// Which verified clients a listener never closes, while a request of theirs is in
/// flight, to make room: the identity (a SPIFFE ID, or the family of several: a workload
/// entry's instances) a client certificate (DER, its chain already verified) names, for
/// the callers the listener exists for: agents on the node API, admins on the remote
/// admin API. `None`: a caller like any other. At most [`MAX_IMMUNE_PER_IDENTITY`]
/// connections per identity: a caller holding more cannot lock others out.
pub type Immunity = Arc<dyn Fn(&[u8]) -> Option<String> + Send + Sync>;

#[derive(Default)]
pub(super) struct Counters {
    refused_at_cap: u64,
    evicted: u64,
    pub(super) timed_out: u64,
}

/// One listener: its limits and its open connections.
pub struct Listener {
    pub(super) name: &'static str,
    cap: usize,
    pub(super) timeouts: Timeouts,
    budget: Option<Arc<DescriptorBudget>>,
    conns: Mutex<Registry>,
    next_id: AtomicU64,
    shutdown_at: Mutex<Option<Instant>>,
    counters: Mutex<(Counters, Instant)>,
    /// Signalled whenever a connection's descriptor is released.
    released: tokio::sync::Notify,
    immunity: Option<Immunity>,
}

pub(super) enum Admission {
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
        Self::with_immunity(name, cap, timeouts, budget, None)
    }

    /// [`Listener::new`], whose verified clients `immunity` names are never closed for
    /// room while a request of theirs is in flight (up to [`MAX_IMMUNE_PER_IDENTITY`]
    /// connections each).
    pub fn with_immunity(
        name: &'static str,
        cap: usize,
        timeouts: Timeouts,
        budget: Option<Arc<DescriptorBudget>>,
        immunity: Option<Immunity>,
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
            immunity,
        })
    }

    /// A connection's client presented `leaf` (its chain verified): the connection is
    /// not closed for room while a request of it is in flight, if the listener's
    /// [`Immunity`] names the leaf and that identity holds fewer than
    /// [`MAX_IMMUNE_PER_IDENTITY`] such connections. Whether it now is.
    pub fn authenticate(&self, state: &ConnState, leaf: &[u8]) -> bool {
        let Some(identity) = self.immunity.as_ref().and_then(|f| f(leaf)) else {
            return false;
        };
        let Ok(reg) = self.conns.lock() else {
            return false;
        };
        let held = reg
            .by_id
            .values()
            .filter(|c| !c.is_closing() && c.immune_as() == Some(identity.as_str()))
            .count();
        if held >= MAX_IMMUNE_PER_IDENTITY {
            return false;
        }
        state.set_immune_as(identity);
        true
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

    pub(super) fn try_admit(
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
        let state = Arc::new(ConnState::new(peer, authenticated));
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

    pub(super) fn remove(&self, id: u64, addr: Option<SocketAddr>) {
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
    pub(super) fn conn_for(&self, ext: &mut http::Extensions) -> Option<Arc<ConnState>> {
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

    pub(super) fn shutdown_deadline(&self) -> Option<Instant> {
        self.shutdown_at
            .lock()
            .ok()
            .and_then(|s| *s)
            .map(|t| t + SHUTDOWN_GRACE)
    }

    /// Counts a closed connection, and logs the counts at most every few seconds (a
    /// flood must not become a flood of log lines).
    pub(super) fn count(&self, f: impl FnOnce(&mut Counters)) {
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
