//! Synchronous calls over an asynchronous driver.
//!
//! The [`DataStore`](crate::datastore::DataStore) trait is synchronous and its callers
//! are synchronous code running anywhere: on a worker of the server's multi-thread
//! runtime, on a `spawn_blocking` thread, on a test's current-thread runtime, or on a
//! plain thread (the CLI). tokio-postgres is asynchronous and its connections are
//! tasks that must keep being polled.
//!
//! So the store owns a small runtime of its own (two named worker threads) on which the
//! pool, its connection tasks, the `LISTEN` connection and the leader connections live.
//! A call spawns its future there and the caller waits for the result:
//!
//! - on a worker of a multi-thread runtime, inside `tokio::task::block_in_place`, which
//!   hands that worker's other tasks to another thread while this one blocks, so the
//!   caller's runtime keeps serving (and blocking a worker never starves it);
//! - anywhere else (a current-thread runtime, where `block_in_place` would panic, a
//!   blocking-pool thread, a plain thread), by blocking the thread on the task's handle
//!   with `futures::executor::block_on`. That cannot deadlock: the awaited task runs on
//!   the store's own threads, never on the thread that waits. On a current-thread
//!   runtime the other tasks wait meanwhile, as they do for any synchronous call (the
//!   sled store's included).
//!
//! `Runtime::block_on` is not usable here: it panics when called from inside another
//! runtime. The runtime is shut down in the background on drop, because dropping a
//! runtime from asynchronous code (a store released inside a task) would panic too.

use std::future::Future;
use std::time::Duration;

use tokio::runtime::{Handle, Runtime, RuntimeFlavor};

use crate::{Error, Result, StoreError};

/// The store's own runtime.
pub(super) struct Bridge {
    runtime: Option<Runtime>,
    handle: Handle,
    /// Upper bound of one call, pool wait included.
    call_timeout: Duration,
}

impl Bridge {
    /// A runtime of two worker threads named `ztid-datastore`.
    pub(super) fn new(call_timeout: Duration) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ztid-datastore")
            .enable_all()
            .build()
            .map_err(Error::io("starting the datastore runtime"))?;
        Ok(Self {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            call_timeout,
        })
    }

    /// The runtime's handle, to spawn background tasks on.
    pub(super) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Runs `fut` on the store's runtime, bounded by the call timeout, and waits for it
    /// from the calling thread (see the module documentation for how).
    pub(super) fn run<T, F>(&self, what: &'static str, fut: F) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
    {
        let limit = self.call_timeout;
        let task = self.handle.spawn(async move {
            match tokio::time::timeout(limit, fut).await {
                Ok(r) => r,
                Err(_) => Err(Error::Store(StoreError::Unreachable(format!(
                    "PostgreSQL: {what}: no answer within {limit:?}"
                )))),
            }
        });
        let wait = move || futures::executor::block_on(task);
        let joined = match Handle::try_current() {
            Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        };
        joined.map_err(|e| Error::Internal(format!("datastore call {what} failed: {e}")))?
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
