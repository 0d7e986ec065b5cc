//! The state of one accepted connection: [`ConnState`] (requests in flight, idle time,
//! closing, and from these its deadline and eviction rank), the [`RequestGuard`] that
//! keeps a request in flight, and the [`ConnHandle`] that unregisters it on drop.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::task::AtomicWaker;

use super::listener::Listener;
use super::timeouts::Timeouts;

struct Activity {
    in_flight: BTreeMap<u64, Instant>,
    next_request: u64,
    started: u64,
    idle_since: Instant,
}

/// The state of one connection, shared by its stream and its requests.
pub struct ConnState {
    pub(super) peer: String,
    opened: Instant,
    authenticated: AtomicBool,
    /// The identity it is authenticated as (see `Immunity`); set once, under the
    /// listener's registry lock.
    immune_as: std::sync::OnceLock<String>,
    activity: Mutex<Activity>,
    closing: Mutex<Option<&'static str>>,
    closing_flag: AtomicBool,
    pub(super) waker: AtomicWaker,
}

impl ConnState {
    /// A connection from `peer` that has sent no request yet.
    pub(super) fn new(peer: &str, authenticated: bool) -> Self {
        Self {
            peer: peer.to_string(),
            opened: Instant::now(),
            authenticated: AtomicBool::new(authenticated),
            immune_as: std::sync::OnceLock::new(),
            activity: Mutex::new(Activity {
                in_flight: BTreeMap::new(),
                next_request: 0,
                started: 0,
                idle_since: Instant::now(),
            }),
            closing: Mutex::new(None),
            closing_flag: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }
    }

    /// The peer, for logs.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Marks the connection as authenticated: a client the listener exists for
    /// (`Listener::authenticate`), or a peer the kernel vouches for (the admin socket).
    pub(super) fn set_authenticated(&self) {
        self.authenticated.store(true, Ordering::Relaxed);
    }

    /// Authenticated as `identity` (see `Listener::authenticate`, which counts them).
    pub(super) fn set_immune_as(&self, identity: String) {
        let _ = self.immune_as.set(identity);
        self.set_authenticated();
    }

    /// The identity the connection is authenticated as, if any.
    pub(super) fn immune_as(&self) -> Option<&str> {
        self.immune_as.get().map(String::as_str)
    }

    pub(super) fn is_closing(&self) -> bool {
        self.closing_flag.load(Ordering::Relaxed)
    }

    /// Closes the connection at its next read or write, which this wakes.
    pub(super) fn close(&self, why: &'static str) {
        if let Ok(mut c) = self.closing.lock() {
            c.get_or_insert(why);
        }
        self.closing_flag.store(true, Ordering::Relaxed);
        self.waker.wake();
    }

    pub(super) fn closing_reason(&self) -> Option<&'static str> {
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
    pub(super) fn deadline(&self, t: &Timeouts) -> (Instant, &'static str) {
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
    pub(super) fn eviction_rank(&self) -> Option<(u8, Instant)> {
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
    pub(super) listener: Arc<Listener>,
    pub(super) id: u64,
    pub(super) addr: Option<SocketAddr>,
    pub(super) state: Arc<ConnState>,
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
